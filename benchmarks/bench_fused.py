"""Times the fused per-layer kernels beside the torch steps they replace, on one GPU.

Rows (bfloat16, Llama-3-8B widths: hidden 4096, 32 / 8 heads of 128, MLP 14336; at a decode batch
of 1 and 32 tokens, and a 4096-token prefill): add + RMSNorm (Llama pre-norm) and the Gemma-2
sandwich (post-norm, add, pre-norm), the final norm of 32 gathered rows, SiLU-and-mul, and rotary
+ KV store (plain, and with OLMo-2's QK-norm). Each row: median time, the bytes the step must move
at least, GB/s and the fraction of the copy bandwidth measured in the same run (bench_kernels.py's
Bench). At batch 1 the times are launch-bound: the count of launches (benchmarks/launch_count.py)
is what the fusion saves there.

Writes benchmarks/results/<YYYY-MM-DD>_<card-slug>_<git short commit>_fused.{json,md}.
    python3 benchmarks/bench_fused.py [--quick]
    python3 benchmarks/bench_fused.py --smoke   # CPU, interpreter, tiny shapes: checks the script
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_kernels as bk  # noqa: E402  (sets up the interpreter for --smoke, maps nudge_engine.kernels)

import torch  # noqa: E402
import triton  # noqa: E402

from nudge_engine.model.config import RopeConfig  # noqa: E402
from nudge_engine.kernels.act_and_mul import act_and_mul  # noqa: E402
from nudge_engine.kernels.add_norm import add_norm  # noqa: E402
from nudge_engine.kernels.rotary_store import rotary_store  # noqa: E402
from nudge_engine.layers.attention import AttentionSpec  # noqa: E402
from nudge_engine.layers.attention_torch import rotary_store_torch  # noqa: E402
from nudge_engine.layers.mlp import act_and_mul_torch  # noqa: E402
from nudge_engine.layers.norm import RMSNorm, add_norm_torch  # noqa: E402
from nudge_engine.layers.rotary import RotaryEmbedding  # noqa: E402

DTYPE = torch.bfloat16


def widths(smoke: bool) -> dict:
    if smoke:
        return dict(hidden=48, heads=4, kv_heads=2, head_dim=16, inter=80, tokens=[1, 5])
    return dict(hidden=4096, heads=32, kv_heads=8, head_dim=128, inter=14336, tokens=[1, 32, 4096])


def rms(hidden, device, unit_offset=False):
    norm = RMSNorm(hidden, 1e-5, unit_offset=unit_offset).to(device=device, dtype=DTYPE)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.1)
    return norm


@torch.no_grad()
def bench_add_norm(b: bk.Bench, w: dict, quick: bool):
    h = w["hidden"]
    for tokens in w["tokens"][:2] if quick else w["tokens"]:
        x = torch.randn(tokens, h, device=b.device, dtype=DTYPE)
        res = torch.randn_like(x)
        nbytes = 4 * x.numel() * 2
        for form, post, pre in (("llama pre-norm", None, rms(h, b.device)),
                                ("gemma2 sandwich", rms(h, b.device, True), rms(h, b.device, True))):
            shape = f"T={tokens} H={h} {form}"
            b.add("add_norm", shape, "triton", lambda: add_norm(x, res, post, pre), nbytes)
            b.add("add_norm", shape, "torch", lambda: add_norm_torch(x, res, post, pre), nbytes)
    tokens = w["tokens"][-1]
    x = torch.randn(tokens, h, device=b.device, dtype=DTYPE)
    res = torch.randn_like(x)
    rows = torch.arange(0, tokens, max(tokens // 32, 1), device=b.device)[:32]
    final = rms(h, b.device)
    shape = f"T={tokens} rows={rows.numel()} H={h}"
    nbytes = 3 * rows.numel() * h * 2
    b.add("final_norm_rows", shape, "triton", lambda: add_norm(x, res, None, final, rows), nbytes)
    b.add("final_norm_rows", shape, "torch", lambda: add_norm_torch(x, res, None, final, rows), nbytes,
          "gather, add, norm")
    b.add("final_norm_rows", shape, "torch (before)", lambda: final(x + res)[rows], 3 * x.numel() * 2,
          "the engine before: norm every row, then gather")


@torch.no_grad()
def bench_act_and_mul(b: bk.Bench, w: dict, quick: bool):
    for tokens in w["tokens"][:2] if quick else w["tokens"]:
        gate_up = torch.randn(tokens, 2 * w["inter"], device=b.device, dtype=DTYPE)
        nbytes = 3 * tokens * w["inter"] * 2
        shape = f"T={tokens} I={w['inter']} silu"
        b.add("act_and_mul", shape, "triton", lambda: act_and_mul(gate_up, "silu"), nbytes)
        b.add("act_and_mul", shape, "torch", lambda: act_and_mul_torch(gate_up, "silu"), nbytes)


@torch.no_grad()
def bench_rotary_store(b: bk.Bench, w: dict, quick: bool):
    heads, kv_heads, d = w["heads"], w["kv_heads"], w["head_dim"]
    rotary = RotaryEmbedding(d, 8192, RopeConfig(500000.0, None)).to(b.device)
    block_size = 16
    for qk_norm in (False, True):
        spec = AttentionSpec(heads, kv_heads, d, d ** -0.5, qk_norm_eps=1e-6 if qk_norm else None)
        norms = (rms(heads * d, b.device), rms(kv_heads * d, b.device)) if qk_norm else (None, None)
        for tokens in w["tokens"][:2] if quick else w["tokens"]:
            num_blocks = triton.cdiv(tokens, block_size) * 2
            qkv = torch.randn(tokens, (heads + 2 * kv_heads) * d, device=b.device, dtype=DTYPE)
            positions = torch.randint(0, 8192, (tokens,), device=b.device)
            slots = torch.randperm(num_blocks * block_size, device=b.device)[:tokens]
            kc = torch.zeros(num_blocks, block_size, kv_heads, d, device=b.device, dtype=DTYPE)
            vc = torch.zeros_like(kc)
            nbytes = 2 * qkv.numel() * 2
            shape = f"T={tokens} H={heads}/{kv_heads} D={d}" + (" qk-norm" if qk_norm else "")
            b.add("rotary_store", shape, "triton",
                  lambda: rotary_store(qkv, positions, spec, rotary, *norms, kc, vc, slots), nbytes)
            b.add("rotary_store", shape, "torch",
                  lambda: rotary_store_torch(qkv, positions, spec, rotary, *norms, kc, vc, slots), nbytes,
                  "cos/sin gathered once, cached")


def main() -> int:
    def sections(smoke: bool):
        w = widths(smoke)
        return [(title, lambda b, quick, fn=fn: fn(b, w, quick)) for title, fn in
                [("add_norm", bench_add_norm), ("act_and_mul", bench_act_and_mul), ("rotary_store", bench_rotary_store)]]
    return bk.run("fused", "Fused kernels", sections)


if __name__ == "__main__":
    sys.exit(main())
