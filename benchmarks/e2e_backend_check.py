"""GPU check: greedy nudged generation with the Triton backend (attention + fused handoff) must
equal the torch backend's, token for token, on tiny pairs (float32) — run by gpu_check.sh. Both eager;
then the Triton backend with CUDA graphs (the default on CUDA) must equal it eagerly (issue 16)."""
from __future__ import annotations

import sys
import tempfile

import torch

from nudge_engine.engine import NudgeEngine
from nudge_engine.engine.sampling_params import NudgeParams, SamplingParams
from nudge_engine.testing import make_tiny_pair

KV_CACHE_BYTES = 256 << 20


def main() -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        for family in ("llama", "llama3", "gemma2", "olmo", "olmo2", "qwen2"):
            base, nudger = make_tiny_pair(f"{tmp}/{family}", family, family, "bytelevel", agreement=0.6,
                                          hidden_size=128, num_heads=2, num_kv_heads=1)
            prompts = [[5 + i for i in range(n)] for n in (1, 17, 40, 3)]
            params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
            nudge = [NudgeParams(gamma=0.5, draft_tokens=k) for k in (0, 1, 4, 8)]
            outs = {}
            for name, backend, eager in (("torch", "torch", True), ("triton", "triton", True),
                                         ("graphs", "triton", None)):
                # A fixed KV budget: sizing from free memory would give the first engine most of the GPU.
                engine = NudgeEngine(base, nudger, device=device, attention_backend=backend,
                                     kv_cache_bytes=KV_CACHE_BYTES, enforce_eager=eager, max_num_seqs=8)
                outs[name] = engine.generate(prompts, params, nudge)
                assert engine.pools_all_free()
                del engine
            same = all(a.token_ids == b.token_ids and a.sources == b.sources
                       for a, b in zip(outs["torch"], outs["triton"]))
            nudged = sum(o.nudged_fraction for o in outs["torch"]) / len(prompts)
            graphs_same = all(a.token_ids == b.token_ids and a.sources == b.sources
                              for a, b in zip(outs["triton"], outs["graphs"]))
            print(f"{family:8s} triton == torch: {same}  graphs == eager: {graphs_same}  "
                  f"(nudged fraction {nudged:.2f})")
            failures += (not same) + (not graphs_same)
    print("e2e backend check:", "PASS" if failures == 0 else f"FAIL ({failures} families differ)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
