"""Times the Triton kernels beside the torch way of doing the same, on one GPU.

Every row: median time (triton.testing.do_bench, L2 flushed between runs), the bytes the
operation must move at least, the achieved GB/s, and that as a fraction of the device-to-device
copy bandwidth measured in the same run (a large dst.copy_(src), counting read + write).

Goals reported against:
  - handoff statistics (top1_stats) at batch 1 over a 256k vocabulary: under 10 us;
  - paged decode attention at 4k context (8 KV heads, head dim 128, bf16): >= 80% of copy bandwidth.

Writes benchmarks/results/<YYYY-MM-DD>_<card-slug>_<git short commit>_kernels.{json,md}.
    python3 benchmarks/bench_kernels.py [--quick]
    python3 benchmarks/bench_kernels.py --smoke   # CPU, interpreter, tiny shapes: checks the script
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from nudge_engine.pairing.handoff_torch import NO_TOKEN, handoff_step_torch, top1_stats_torch  # noqa: E402
from nudge_engine.kernels.handoff_step import handoff_step  # noqa: E402
from nudge_engine.kernels.handoff_walk import handoff_walk  # noqa: E402
from nudge_engine.kernels.attention_tiles import decode_num_splits  # noqa: E402
from nudge_engine.kernels.paged_attention import paged_attention  # noqa: E402
from nudge_engine.kernels.store_kv import store_kv  # noqa: E402
from nudge_engine.kernels.top1_stats import top1_stats  # noqa: E402
from nudge_engine.layers.attention_metadata import NO_BLOCK, AttentionMetadata  # noqa: E402
from nudge_engine.layers.attention_torch import paged_attention_torch, store_kv_torch  # noqa: E402

import triton  # noqa: E402


class Bench:
    def __init__(self, device: str, smoke: bool):
        self.device = device
        self.smoke = smoke
        self.rows: list[dict] = []
        self.copy_gbps = float("nan")

    def time_us(self, fn) -> float:
        if self.smoke:
            fn()
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return statistics.median(times) * 1e6
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3

    def add(self, kernel: str, shape: str, impl: str, fn, nbytes: int, note: str = ""):
        try:
            us = self.time_us(fn)
            err = ""
        except Exception as exc:  # one failing row must not hide the others
            us, err = float("nan"), f"{type(exc).__name__}: {exc}"[:200]
        gbps = nbytes / (us * 1e-6) / 1e9 if us == us and us > 0 else float("nan")
        row = dict(kernel=kernel, shape=shape, impl=impl, time_us=us, bytes=nbytes, gbps=gbps,
                   frac_copy_bw=gbps / self.copy_gbps if self.copy_gbps == self.copy_gbps else float("nan"),
                   note=note, error=err)
        self.rows.append(row)
        print(f"  {kernel:18s} {shape:44s} {impl:14s} {us:10.2f} us {gbps:9.1f} GB/s "
              f"{row['frac_copy_bw'] * 100:6.1f}% {note} {err}", flush=True)
        return us


def measure_copy(b: Bench, quick: bool):
    nbytes = (64 << 20) if b.smoke else ((1 << 30) if not quick else (512 << 20))
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=b.device).normal_()
    dst = torch.empty_like(src)
    us = b.time_us(lambda: dst.copy_(src))
    b.copy_gbps = 2 * nbytes / (us * 1e-6) / 1e9
    b.rows.append(dict(kernel="copy", shape=f"{nbytes >> 20} MiB", impl="torch copy_", time_us=us,
                       bytes=2 * nbytes, gbps=b.copy_gbps, frac_copy_bw=1.0, note="reference bandwidth", error=""))
    print(f"  copy {nbytes >> 20} MiB: {us:.1f} us, {b.copy_gbps:.1f} GB/s (read + write)", flush=True)
    del src, dst


def bench_top1(b: Bench, quick: bool):
    shapes = [(1, 256000, torch.bfloat16), (1, 256000, torch.float32), (1, 128256, torch.bfloat16),
              (5, 256000, torch.bfloat16), (32, 128256, torch.bfloat16), (160, 151936, torch.bfloat16)]
    if quick:
        shapes = shapes[:1] + shapes[3:5]
    if b.smoke:
        shapes = [(1, 4000, torch.bfloat16), (3, 1023, torch.float32)]
    for num_pos, vocab, dtype in shapes:
        logits = torch.randn(num_pos, vocab, device=b.device).to(dtype)
        tokens = torch.randint(0, vocab, (num_pos,), device=b.device)
        nbytes = logits.numel() * logits.element_size()
        shape = f"P={num_pos} V={vocab} {str(dtype).replace('torch.', '')}"
        b.add("top1_stats", shape, "triton", lambda: top1_stats(logits, tokens), nbytes,
              "goal < 10 us" if num_pos == 1 and vocab == 256000 else "")
        b.add("top1_stats", shape, "torch", lambda: top1_stats_torch(logits, tokens), nbytes)
        del logits


def walk_inputs(num_req: int, k: int, vocab: int, device):
    num_pos = num_req * (k + 1)
    drafts = torch.randint(0, vocab, (num_pos,), device=device)
    pos_start = torch.arange(0, num_pos + 1, k + 1, dtype=torch.int32, device=device)
    drafts[pos_start[1:].long() - 1] = NO_TOKEN
    mode = torch.zeros(num_req, dtype=torch.int32, device=device)
    run = torch.zeros(num_req, dtype=torch.int32, device=device)
    gamma = torch.full((num_req,), 0.4, device=device)
    roa = torch.ones(num_req, dtype=torch.bool, device=device)
    word_start = torch.rand(vocab, device=device) < 0.3
    return drafts, pos_start, mode, run, gamma, roa, word_start


def bench_handoff(b: Bench, quick: bool):
    cases = [(1, 0, 256000), (1, 4, 256000), (32, 4, 128256)]
    if quick:
        cases = cases[:2]
    if b.smoke:
        cases = [(1, 2, 3000)]
    for num_req, k, vocab in cases:
        num_pos = num_req * (k + 1)
        logits = torch.randn(num_pos, vocab, device=b.device).to(torch.bfloat16)
        args = walk_inputs(num_req, k, vocab, b.device)
        nbytes = logits.numel() * logits.element_size()
        shape = f"R={num_req} k={k} V={vocab} bf16"
        b.add("handoff_step", shape, "triton", lambda: handoff_step(logits, *args), nbytes,
              "stats + walk, packed")
        b.add("handoff_step", shape, "torch", lambda: handoff_step_torch(logits, *args), nbytes)
        del logits
    num_req, k = (256, 4) if not b.smoke else (8, 2)
    drafts, pos_start, mode, run, gamma, roa, word_start = walk_inputs(num_req, k, 32000, b.device)
    argmax = drafts.clamp(min=0)
    top1 = torch.rand(drafts.shape[0], device=b.device)
    b.add("handoff_walk", f"R={num_req} k={k}", "triton",
          lambda: handoff_walk(argmax, top1, drafts, pos_start, mode, run, gamma, roa, word_start),
          drafts.numel() * 20, "latency-bound")


def make_paged(batch, ctx, qlen, heads, kv_heads, head_dim, block_size, dtype, device):
    blocks_per_seq = triton.cdiv(ctx, block_size)
    num_blocks = batch * blocks_per_seq
    # Scattered pages, as after a while of serving.
    perm = torch.randperm(num_blocks, device=device).to(torch.int32)
    tables = perm.view(batch, blocks_per_seq)
    tables = torch.cat([tables, torch.full((batch, 1), NO_BLOCK, dtype=torch.int32, device=device)], 1)
    qsl = torch.arange(0, batch * qlen + 1, qlen, dtype=torch.int32, device=device)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(batch * qlen, dtype=torch.int64, device=device), block_tables=tables,
        query_start_loc=qsl, seq_lens=torch.full((batch,), ctx, dtype=torch.int32, device=device),
        max_query_len=qlen, max_seq_len=ctx, block_size=block_size)
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, device=device, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    query = torch.randn(batch * qlen, heads, head_dim, device=device, dtype=dtype)
    return query, k_cache, v_cache, meta


def bench_attention(b: Bench, quick: bool):
    heads, kv_heads, head_dim, block_size, dtype = 32, 8, 128, 16, torch.bfloat16
    # (batch, context, query length): decode at 4k (the bandwidth goal), long-context decode at
    # batch 1 (flash-decoding), the k = 4 draft verify, a prefill chunk.
    cases = [(8, 4096, 1), (32, 4096, 1), (1, 32768, 1), (16, 4096, 5), (1, 2048, 2048)]
    if quick:
        cases = [(8, 4096, 1), (32, 4096, 1), (16, 4096, 5)]
    if b.smoke:
        heads, kv_heads, head_dim = 4, 2, 16
        cases = [(2, 64, 1), (2, 64, 3)]
    for batch, ctx, qlen in cases:
        q, kc, vc, meta = make_paged(batch, ctx, qlen, heads, kv_heads, head_dim, block_size, dtype, b.device)
        scale = head_dim ** -0.5
        kv_bytes = 2 * batch * ctx * kv_heads * head_dim * kc.element_size()
        nbytes = kv_bytes + 2 * q.numel() * q.element_size()
        kind = "paged_decode" if qlen == 1 else ("paged_verify" if qlen <= 16 else "paged_prefill")
        shape = f"B={batch} ctx={ctx} q={qlen} H={heads}/{kv_heads} D={head_dim}"
        note = ""
        if qlen == 1:
            note = f"splits={decode_num_splits(meta, kv_heads, 0, q.device)}"
            if ctx == 4096:
                note += "; goal >= 80% copy BW"
        if qlen > 16:
            note = f"{4 * batch * heads * qlen * ctx * head_dim / 2 / 1e12:.3f} TFLOP (causal)"
        b.add(kind, shape, "triton", lambda: paged_attention(q, kc, vc, meta, scale), nbytes, note)
        # The dense ideal: SDPA over K/V already contiguous per sequence (no page gather).
        kd = torch.randn(batch, kv_heads, ctx, head_dim, device=b.device, dtype=dtype)
        vd = torch.randn_like(kd)
        qd = q.view(batch, qlen, heads, head_dim).transpose(1, 2)
        sdpa = torch.nn.functional.scaled_dot_product_attention

        def dense():
            # Causal among the queries, which are the last qlen positions: an explicit mask.
            if qlen == 1:
                return sdpa(qd, kd, vd, scale=scale, enable_gqa=True)
            if qlen == ctx:
                return sdpa(qd, kd, vd, is_causal=True, scale=scale, enable_gqa=True)
            mask = torch.ones(qlen, ctx, dtype=torch.bool, device=b.device).tril(ctx - qlen)
            return sdpa(qd, kd, vd, attn_mask=mask, scale=scale, enable_gqa=True)
        b.add(kind, shape, "torch sdpa", dense, nbytes, "dense K/V, not paged")
        if batch * ctx <= 8 * 4096 and qlen <= 16:
            b.add(kind, shape, "torch backend", lambda: paged_attention_torch(q, kc, vc, meta, scale), nbytes,
                  "gather + einsum")
        del q, kc, vc, kd, vd


def bench_store_kv(b: Bench, quick: bool):
    kv_heads, head_dim, block_size = 8, 128, 16
    cases = [32, 4096] if not b.smoke else [5]
    if b.smoke:
        kv_heads, head_dim = 2, 16
    for num_tokens in cases:
        num_blocks = triton.cdiv(num_tokens, block_size) * 4
        key = torch.randn(num_tokens, kv_heads, head_dim, device=b.device, dtype=torch.bfloat16)
        value = torch.randn_like(key)
        kc = torch.zeros(num_blocks, block_size, kv_heads, head_dim, device=b.device, dtype=torch.bfloat16)
        vc = torch.zeros_like(kc)
        slots = torch.randperm(num_blocks * block_size, device=b.device)[:num_tokens]
        nbytes = 4 * key.numel() * key.element_size() + slots.numel() * 8
        shape = f"T={num_tokens} KVH={kv_heads} D={head_dim}"
        b.add("store_kv", shape, "triton", lambda: store_kv(key, value, kc, vc, slots), nbytes)
        b.add("store_kv", shape, "torch", lambda: store_kv_torch(key, value, kc, vc, slots), nbytes)


def card_slug(device: str) -> str:
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu-interpreter"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def git_short() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip() or "nogit"
    except Exception:
        return "nogit"


def to_markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"# Kernel benchmark: {meta['device_name']}", "",
             f"{meta['date']}, commit {meta['commit']}, torch {meta['torch']}, triton {meta['triton']}. "
             f"Copy bandwidth (read + write): {meta['copy_gbps']:.0f} GB/s.", "",
             "| kernel | shape | impl | time us | bytes | GB/s | of copy BW | note |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        note = r["note"] + (f" ERROR {r['error']}" if r["error"] else "")
        lines.append(f"| {r['kernel']} | {r['shape']} | {r['impl']} | {r['time_us']:.2f} | {r['bytes']:,} | "
                     f"{r['gbps']:.1f} | {100 * r['frac_copy_bw']:.1f}% | {note} |")
    lines += ["", "## Goals", ""]
    for line in meta["goals"]:
        lines.append(f"- {line}")
    return "\n".join(lines) + "\n"


def goals(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        if r["impl"] != "triton":
            continue
        if r["kernel"] == "top1_stats" and r["shape"].startswith("P=1 V=256000 bfloat16"):
            ok = r["time_us"] < 10
            out.append(f"top1_stats batch 1, 256k vocab, bf16: {r['time_us']:.2f} us (goal < 10 us): "
                       f"{'MET' if ok else 'NOT MET'}")
        if r["kernel"] == "handoff_step" and r["shape"].startswith("R=1 k=0"):
            out.append(f"handoff_step (stats + walk) batch 1, 256k vocab: {r['time_us']:.2f} us "
                       f"({'under' if r['time_us'] < 10 else 'over'} 10 us)")
        if r["kernel"] == "paged_decode" and "ctx=4096" in r["shape"]:
            ok = r["frac_copy_bw"] >= 0.8
            out.append(f"paged decode {r['shape']}: {100 * r['frac_copy_bw']:.1f}% of copy bandwidth "
                       f"(goal >= 80%): {'MET' if ok else 'NOT MET'}")
    return out


def run(name: str, title: str, sections, goals_fn=None) -> int:
    """The main of a kernel benchmark script: copy bandwidth, then each section, then the JSON and
    markdown results named `<date>_<card>_<commit>_<name>`. sections(smoke) -> [(title, fn(bench, quick))];
    a section that raises becomes an error row, so the other sections keep their numbers."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer shapes")
    ap.add_argument("--smoke", action="store_true", help="CPU + interpreter, tiny shapes (checks the script)")
    ap.add_argument("--out-dir", default=None, help="default benchmarks/results (a temp dir with --smoke)")
    args = ap.parse_args()
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke to check the script on the CPU", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    b = Bench(device, args.smoke)
    print("== copy bandwidth", flush=True)
    measure_copy(b, args.quick)
    for section, fn in sections(args.smoke):
        print(f"== {section}", flush=True)
        try:
            fn(b, args.quick)
        except Exception as exc:  # keep the other sections' numbers
            print(f"  section failed: {type(exc).__name__}: {exc}", flush=True)
            b.rows.append(dict(kernel=section, shape="", impl="", time_us=float("nan"), bytes=0, gbps=float("nan"),
                               frac_copy_bw=float("nan"), note="", error=f"{type(exc).__name__}: {exc}"[:300]))

    meta = dict(date=datetime.date.today().isoformat(), commit=git_short(),
                device_name=torch.cuda.get_device_name() if device == "cuda" else "CPU (TRITON_INTERPRET=1)",
                torch=torch.__version__, triton=triton.__version__, copy_gbps=b.copy_gbps, quick=args.quick)
    meta["goals"] = goals_fn(b.rows) if goals_fn else []
    if goals_fn:
        print("== goals")
        for line in meta["goals"]:
            print("  " + line)
    out_dir = Path(args.out_dir) if args.out_dir else (
        Path("/tmp/nudge_bench_smoke") if args.smoke else ROOT / "benchmarks" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{meta['date']}_{card_slug(device)}_{meta['commit']}_{name}"
    (out_dir / f"{stem}.json").write_text(json.dumps(dict(meta=meta, rows=b.rows), indent=1))
    (out_dir / f"{stem}.md").write_text(to_markdown(meta, b.rows).replace("Kernel benchmark", title))
    print(f"wrote {out_dir / stem}.json and .md")
    return 1 if any(r["error"] for r in b.rows) else 0


def main() -> int:
    return run("kernels", "Kernel benchmark", lambda smoke: [
        ("top1_stats", bench_top1), ("handoff", bench_handoff), ("paged attention", bench_attention),
        ("store_kv", bench_store_kv)], goals)


if __name__ == "__main__":
    sys.exit(main())
