"""Production-shaped launches for the compile gate, recorded without running (no GPU needed).

Drives the engine's own launchers the way a GPU round does: TritonAttentionBackend (store_kv +
paged attention) for decode at batch 1 / 64 / 256, verify chunks of k + 1 tokens and a prefill
chunk; the backend's fused per-layer steps (add_norm in each family's norm form and as the final
norm of the logits rows, act_and_mul, rotary_store) as a decoder layer calls them; the fused
handoff step and top1 stats on float32 base logits of real vocabulary sizes.
The interpreter is off (so the launchers plan GPU tiles) and PRETEND_SMS is the target GPU's SM
count (so split counts match it); launches are recorded and skipped, so the tensors are only
allocated, never touched (large logits stay virtual memory).

    python -m benchmarks.compile_gate_shapes OUT.jsonl
"""
from __future__ import annotations

import os
import sys

os.environ["TRITON_INTERPRET"] = "0"  # before any kernel module: GPU launch plans, JITFunctions

import torch  # noqa: E402

from benchmarks.launch_recorder import LaunchRecorder  # noqa: E402

# Attention shapes of the models the engine serves (bases and nudgers). What picks a binary: head
# dim, GQA group, softcap / window, and whether the head count is a multiple of 16. OLMo-2-1B gives
# the same binaries as OLMo-2-7B; Gemma-2-2B differs from Gemma-2-9B only in its 8 heads (not a
# multiple of 16): left out, it would add compile time, not coverage of tiles or registers.
MODELS = {
    "olmo2-7b": dict(heads=32, kv=32, head_dim=128),
    "llama3-8b": dict(heads=32, kv=8, head_dim=128),
    "llama3.2-1b": dict(heads=32, kv=8, head_dim=64),
    "gemma2-9b": dict(heads=16, kv=8, head_dim=256, window=4096, softcap=50.0),
}
# Vocabulary sizes for the top-1 / handoff kernels: OLMo-1, OLMo-2, Llama-3, Gemma-2.
VOCABS = (50304, 100352, 128256, 256000)
TARGET_SMS = {"sm80": 108, "sm90": 132}   # A100, H100
# KV cache layouts (dtype, block size). The block size is a shift in the kernels and fp16 only changes
# the element type of loads and MMA operands: the full cross product adds compile time, not coverage.
CACHE_LAYOUTS = ((torch.bfloat16, 16), (torch.bfloat16, 32), (torch.float16, 16))
BATCHES = (1, 64, 256)
DRAFTS = (1, 4, 8)              # verify chunks of k + 1 tokens
CONTEXTS = (1024, 8192)         # decode context lengths (they set the flash-decoding split count)
PREFILL_CHUNK = 512
NUM_BLOCKS = 8                  # the cache is never read: a few blocks keep memory small


def _meta(qlens: list[int], ctx: int, block_size: int):
    from nudge_engine.layers.attention_metadata import AttentionMetadata

    n = len(qlens)
    blocks = -(-ctx // block_size)
    qsl = torch.zeros(n + 1, dtype=torch.int32)
    qsl[1:] = torch.tensor(qlens, dtype=torch.int32).cumsum(0)
    return AttentionMetadata(
        slot_mapping=torch.zeros(sum(qlens), dtype=torch.int64),
        block_tables=torch.zeros(n, blocks, dtype=torch.int32),
        query_start_loc=qsl,
        seq_lens=torch.full((n,), ctx, dtype=torch.int32),
        max_query_len=max(qlens), max_seq_len=ctx, block_size=block_size,
    )


def attention_launches(model: dict, dtype: torch.dtype, block_size: int) -> None:
    from nudge_engine.kernels.backend import TritonAttentionBackend
    from nudge_engine.layers.attention_torch import NO_SOFTCAP, NO_WINDOW

    backend = TritonAttentionBackend()
    hd, heads, kv = model["head_dim"], model["heads"], model["kv"]
    k_cache = torch.empty(NUM_BLOCKS, block_size, kv, hd, dtype=dtype)
    v_cache = torch.empty_like(k_cache)
    windows = [NO_WINDOW] + ([model["window"]] if "window" in model else [])
    softcap = model.get("softcap", NO_SOFTCAP)

    def launch(qlens, ctx, window):
        meta = _meta(qlens, ctx, block_size)
        # q / k / v as the engine makes them: views into one fused QKV projection.
        qkv = torch.empty(meta.slot_mapping.shape[0], (heads + 2 * kv) * hd, dtype=dtype)
        q, k, v = qkv.split([heads * hd, kv * hd, kv * hd], dim=-1)
        backend.plan(meta)
        backend.forward(q.view(-1, heads, hd), k.view(-1, kv, hd), v.view(-1, kv, hd),
                        k_cache, v_cache, meta, hd ** -0.5, window, softcap)

    for window in windows:
        for batch in BATCHES:
            for ctx in CONTEXTS:
                launch([1] * batch, ctx, window)                      # decode
            for k in DRAFTS:
                launch([k + 1] * batch, CONTEXTS[0] + k + 1, window)  # verify a k-token draft
        launch([PREFILL_CHUNK], PREFILL_CHUNK, window)                # a prefill chunk


# Per-layer shapes of the bases / nudgers for the fused steps: hidden, MLP width, heads, norm form,
# activation, QK-norm (OLMo-2), clip_qkv (OLMo-1) and the RoPE table (Llama-3 frequency scaling).
# OLMo-1B-0724 is the one family with a weightless LayerNorm.
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
LAYER_MODELS = {
    "olmo2-7b": dict(hidden=4096, inter=11008, heads=32, kv=32, head_dim=128, norm="olmo2", act="silu",
                     theta=500000.0, qk_norm=True),
    "llama3-8b": dict(hidden=4096, inter=14336, heads=32, kv=8, head_dim=128, norm="llama", act="silu",
                      theta=500000.0, scaling=LLAMA3_ROPE),
    "gemma2-9b": dict(hidden=3584, inter=14336, heads=16, kv=8, head_dim=256, norm="gemma2",
                      act="gelu_pytorch_tanh", theta=10000.0),
    "olmo-1b": dict(hidden=2048, inter=8192, heads=16, kv=16, head_dim=128, norm="olmo", act="silu",
                    theta=10000.0, clip=8.0),
}
LAYER_DTYPES = (torch.bfloat16, torch.float16)
MAX_POSITIONS = 8192


def _layer_norms(kind: str, hidden: int, dtype: torch.dtype):
    """(first layer's pre_attn, post_attn, pre_mlp, post_mlp, final) norm modules, or None, as
    layers/decoder.py places them for the family (models/llama.py, olmo.py, gemma2.py)."""
    from nudge_engine.layers.norm import NonParametricLayerNorm, RMSNorm

    def rms(unit_offset=False):
        return RMSNorm(hidden, 1e-6, unit_offset=unit_offset).to(dtype)

    if kind == "llama":
        return rms(), None, rms(), None, rms()
    if kind == "olmo2":
        return None, rms(), None, rms(), rms()
    if kind == "gemma2":
        return rms(True), rms(True), rms(True), rms(True), rms(True)
    return NonParametricLayerNorm(hidden), None, NonParametricLayerNorm(hidden), None, NonParametricLayerNorm(hidden)


def fused_layer_launches(model: dict, dtype: torch.dtype) -> None:
    """One decoder layer's fused steps and the final norm, in the order CausalLM.forward calls them."""
    from nudge_engine.model.config import RopeConfig
    from nudge_engine.kernels.backend import TritonAttentionBackend
    from nudge_engine.layers.attention import AttentionSpec
    from nudge_engine.layers.norm import RMSNorm
    from nudge_engine.layers.rotary import RotaryEmbedding

    backend = TritonAttentionBackend()
    hidden, inter, hd, heads, kv = (model[k] for k in ("hidden", "inter", "head_dim", "heads", "kv"))
    pre_attn, post_attn, pre_mlp, post_mlp, final = _layer_norms(model["norm"], hidden, dtype)
    spec = AttentionSpec(heads, kv, hd, hd ** -0.5, qk_norm_eps=1e-6 if model.get("qk_norm") else None,
                         clip_qkv=model.get("clip"))
    qk_norms = ((RMSNorm(heads * hd, 1e-6).to(dtype), RMSNorm(kv * hd, 1e-6).to(dtype))
                if model.get("qk_norm") else (None, None))
    rotary = RotaryEmbedding(hd, MAX_POSITIONS, RopeConfig(model["theta"], model.get("scaling")))
    k_cache = torch.empty(NUM_BLOCKS, 16, kv, hd, dtype=dtype)
    v_cache = torch.empty_like(k_cache)

    def launch(qlens, num_rows):
        meta = _meta(qlens, CONTEXTS[0], 16)
        n = meta.slot_mapping.shape[0]
        x = torch.empty(n, hidden, dtype=dtype)
        h, residual = backend.add_norm(x, None, None, pre_attn)               # first layer (no residual)
        h, residual = backend.add_norm(x, residual, post_mlp, pre_attn)       # later layers
        backend.rotary_store(torch.empty(n, (heads + 2 * kv) * hd, dtype=dtype), torch.empty(n, dtype=torch.int64),
                             spec, rotary, *qk_norms, k_cache, v_cache, meta)
        h, residual = backend.add_norm(x, residual, post_attn, pre_mlp)       # after attention
        backend.act_and_mul(torch.empty(n, 2 * inter, dtype=dtype), model["act"])
        rows = torch.empty(num_rows, dtype=torch.int64)
        backend.add_norm(x, residual, post_mlp, final, rows)                  # final norm of the logits rows

    for batch in BATCHES:
        launch([1] * batch, batch)                                            # decode
        k = DRAFTS[1]
        launch([k + 1] * batch, (k + 1) * batch)                              # verify a k-token draft
    launch([PREFILL_CHUNK], 1)                                                # a prefill chunk: its last row


def handoff_launches(vocab: int) -> None:
    from nudge_engine.kernels.handoff_step import handoff_step
    from nudge_engine.kernels.top1_stats import top1_stats

    word_start = torch.empty(vocab, dtype=torch.bool)
    for batch in BATCHES:
        for k in (0,) + DRAFTS:
            pos = batch * (k + 1)
            logits = torch.empty(pos, vocab, dtype=torch.float32)  # [P, vocab], never touched
            handoff_step(
                logits, torch.empty(pos, dtype=torch.int64),
                torch.arange(0, pos + 1, k + 1, dtype=torch.int32),
                torch.empty(batch, dtype=torch.int32), torch.empty(batch, dtype=torch.int32),
                torch.empty(batch, dtype=torch.float32), torch.empty(batch, dtype=torch.bool), word_start)
            top1_stats(logits, torch.empty(pos, dtype=torch.int64))
            del logits
    top1_stats(torch.empty(BATCHES[-1], vocab, dtype=torch.bfloat16))


def record(path: str) -> int:
    from nudge_engine.kernels import utils

    total = 0
    for target, sms in TARGET_SMS.items():
        utils.PRETEND_SMS = sms
        with LaunchRecorder(execute=False, tag="production", target=target) as rec:
            for model in MODELS.values():
                for dtype, block_size in CACHE_LAYOUTS:
                    attention_launches(model, dtype, block_size)
            for model in LAYER_MODELS.values():
                for dtype in LAYER_DTYPES:
                    fused_layer_launches(model, dtype)
            for vocab in VOCABS:
                handoff_launches(vocab)
        rec.save(path)
        total += len(rec.records)
    return total


if __name__ == "__main__":
    n = record(sys.argv[1])
    print(f"recorded {n} production specializations into {sys.argv[1]}")
