"""Triton kernels (installed as `nudge_engine.kernels`), one kernel and its launcher per module:

    store_kv        write new K/V into the paged cache
    paged_attention variable-length paged attention, with a flash-decoding path
    top1_stats      per-row max / argmax / log-sum-exp / token log-prob, vocabulary split
    handoff_walk    the section-5 draft walk, one program per request
    handoff_step    top1 stats + walk fused, one packed result per step
    add_norm        residual add fused with the norms around it; the final norm of the logits rows
    act_and_mul     SiLU / GELU-tanh of the gate times up
    rotary_store    clip / QK-norm + rotary on q and k + K/V into the paged cache
    backend         TritonAttentionBackend (attention and the fused per-layer steps)

Import-light on purpose: importing this package must not import triton, so the CPU engine
works where triton is absent. Import the modules themselves to use a kernel.
"""
