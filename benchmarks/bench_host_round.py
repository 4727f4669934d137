"""Host time per engine round, eager against graph replay (model/graph_runner.py).

--noop (the default on the CPU): the model forwards are replaced by no-ops (a fixed logits row,
no layer runs), so what is timed is the engine's own host work per round at 1 / 16 / 256
requests: scheduling, batch building, static-buffer copies and padding (replay) or fresh input
tensors (eager), the draft loop, the walk and its one host read, bookkeeping. The CPU's replay is
the emulation (it calls the recorded callable), so replay - eager there is the static-buffer cost;
nudged rows also time the replay with one graph per draft pass ("replay per pass") beside the draft
passes after the first as one graph (model/draft_graph.py).

--gpu: real forwards on CUDA at batch 1 (a small pair, where launches dominate): ms per token of
the base alone and nudged (k = 4), eager against CUDA graphs; benchmarks/gpu_check.sh stage 2.

    python -m benchmarks.bench_host_round [--quick] [--gpu] [--out DIR]
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.hardware import device_name, environment, setup_device
from benchmarks.report import write_results
from nudge_engine.engine import NudgeEngine
from nudge_engine.engine.sampling_params import NudgeParams, SamplingParams
from nudge_engine.model.model_runner import ModelRunner
from nudge_engine.testing import make_tiny_pair

REQUESTS = (1, 16, 256)
PROMPT_LEN = 16
DRAFTS = 4
GAMMA = 0.4


@contextlib.contextmanager
def noop_forwards(vocab: int):
    """ModelRunner.forward returns a fixed logits row per wanted row: one token wins clearly (the
    base writes and accepts every draft, so each nudged round drafts k and emits k + 1)."""
    row = torch.full((vocab,), -10.0)
    row[42] = 10.0
    real = ModelRunner.forward

    def forward(self, step, logits_indices):
        return row.to(self.device).expand(logits_indices.shape[0], vocab)

    ModelRunner.forward = forward
    try:
        yield
    finally:
        ModelRunner.forward = real


def time_rounds(engine: NudgeEngine, n: int, rounds: int, nudged: bool, device) -> float:
    """Median seconds per engine.step() over `rounds` decode rounds of n requests."""
    max_tokens = (rounds + 8) * (DRAFTS + 1)
    nudge = NudgeParams(gamma=GAMMA if nudged else 0.0, draft_tokens=DRAFTS if nudged else 0, adaptive_drafting=False)
    for r in range(n):
        engine.add_request([5 + (r + i) % 50 for i in range(PROMPT_LEN)],
                           SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True), nudge)
    for _ in range(3):   # prefill and warm-up
        engine.step()
    times = []
    for _ in range(rounds):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        engine.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    for rid in list(engine.requests):
        engine.abort(rid)
    assert engine.pools_all_free()
    return statistics.median(times)


def noop_table(pair, device, quick: bool) -> list[dict]:
    rows = []
    vocab = NudgeEngine(pair[0], enforce_eager=True, num_blocks=4).base.config.vocab_size
    with noop_forwards(vocab):
        for n in REQUESTS:
            rounds = {1: 80, 16: 40, 256: 12}[n] // (4 if quick else 1)   # (rounds + 8) * 5 tokens fit 512
            blocks = n * (-(-(PROMPT_LEN + (rounds + 8) * (DRAFTS + 1) + 8) // 16) + 1)
            for nudged in (False, True):
                row = {"requests": n, "pairing": "nudged k=4" if nudged else "base alone"}
                # replay: the draft passes after the first as one graph (model/draft_graph.py);
                # replay per pass: one graph replay per draft pass
                modes = (("eager", True, False), ("replay per pass", False, False), ("replay", False, True))
                for mode, eager, fused in modes if nudged else (modes[0], modes[2]):
                    engine = NudgeEngine(pair[0], pair[1] if nudged else None, device=device, enforce_eager=eager,
                                         max_num_seqs=n, num_blocks=blocks, max_num_batched_tokens=max(4096, n * 32))
                    if nudged and not fused:
                        engine.nudger.draft_graphs = None
                    row[f"{mode} ms/round"] = 1e3 * time_rounds(engine, n, rounds, nudged, device)
                    row[f"{mode} host reads/round"] = engine.stats.host_reads / max(engine.stats.rounds / n, 1)
                row["replay / eager"] = row["replay ms/round"] / row["eager ms/round"]
                rows.append(row)
                print(row, flush=True)
    return rows


def gpu_table(pair, device, quick: bool) -> list[dict]:
    rows = []
    rounds = 30 if quick else 80
    for nudged in (False, True):
        row = {"requests": 1, "pairing": "nudged k=4" if nudged else "base alone"}
        for mode, eager in (("eager", True), ("graphs", False)):
            engine = NudgeEngine(pair[0], pair[1] if nudged else None, device=device, dtype="bfloat16",
                                 enforce_eager=eager, max_num_seqs=8, kv_cache_bytes=512 << 20)
            before_tokens = engine.stats.base_tokens + engine.stats.nudger_tokens
            per_round = time_rounds(engine, 1, rounds, nudged, device)
            tokens = engine.stats.base_tokens + engine.stats.nudger_tokens - before_tokens
            row[f"{mode} ms/token"] = 1e3 * per_round * max(engine.stats.rounds, 1) / max(tokens, 1)
        row["graphs / eager"] = row["graphs ms/token"] / row["eager ms/token"]
        rows.append(row)
        print(row, flush=True)
    return rows


def markdown(rows: list[dict], title: str) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [f"# {title}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k, "-")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="real forwards on CUDA, batch 1, eager vs CUDA graphs")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = setup_device("cuda" if args.gpu else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        kw = dict(hidden_size=512, num_heads=8, num_kv_heads=2, num_layers=8) if args.gpu else {}
        pair = make_tiny_pair(Path(tmp) / "pair", "llama", "llama", "bytelevel", agreement=0.6, **kw)
        rows = gpu_table(pair, device, args.quick) if args.gpu else noop_table(pair, device, args.quick)
    title = ("ms/token at batch 1, eager vs CUDA graphs" if args.gpu
             else "host ms per round, model forwards as no-ops, eager vs replay emulation")
    md = markdown(rows, f"{title} ({device_name(device)})")
    print(md)
    paths = write_results(args.out, device, "host_round" if not args.gpu else "graphs_batch1", "tiny",
                          {"env": environment(device), "rows": rows}, md)
    print("wrote", *paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
