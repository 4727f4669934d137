"""Host time per engine round, with the model forwards as no-ops; before and after a change side by side.

--noop (the default on the CPU): the model forwards are replaced by no-ops (a fixed logits row,
no layer runs), so what is timed is the engine's own host work per round at 1 / 16 / 256
requests: scheduling, batch building, static-buffer copies and padding (replay) or fresh input
tensors (eager), the draft loop, the walk and its one host read, bookkeeping. Configurations: the
base alone, nudging without drafts (k = 0), with k = 4 drafts, and the default adaptive plan (k <= 4).
The CPU's replay is the emulation (it calls the recorded callable), so replay - eager there is the
static-buffer cost; the nudged k = 4 rows also time the replay with one graph per draft pass
("replay per pass") beside the draft passes after the first as one graph (model/draft_graph.py).

--before TREE: the same table for another checkout's engine (its nudge_engine/ with a built C++
core, e.g. `git archive <commit> | tar -x -C TREE` and `python setup.py build_ext --inplace` there),
run interleaved with this one's (--repeats worker processes each, alternating), medians, side by side.

--gpu: real forwards on CUDA at batch 1 (a small pair, where launches dominate): ms per token of
the base alone and nudged (k = 4), eager against CUDA graphs; benchmarks/gpu_check.sh stage 2.

    python -m benchmarks.bench_host_round [--quick] [--before TREE [--repeats 5]] [--gpu] [--out DIR]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks import hardware  # noqa: E402

REQUESTS = (1, 16, 256)
PROMPT_LEN = 16
DRAFTS = 4
GAMMA = 0.4
CONFIGS = ("base alone", "nudged k=0", "nudged k=4", "nudged default")
MODES = ("eager", "replay")           # replay: the draft passes after the first as one graph
PER_PASS = "replay per pass"          # nudged k=4 only: one graph replay per draft pass
ROUNDS = {1: 80, 16: 40, 256: 16}
_KEEP: list = []                      # temporary folders that live as long as the process


def rounds_for(n: int, quick: bool) -> int:
    return ROUNDS[n] // (4 if quick else 1)


def load_tree():
    """(NudgeEngine, tiny pair paths, vocab) from whichever nudge_engine sys.path finds first."""
    from nudge_engine.engine import NudgeEngine
    from nudge_engine.testing import make_tiny_pair
    tmp = tempfile.TemporaryDirectory()
    _KEEP.append(tmp)
    pair = make_tiny_pair(Path(tmp.name) / "pair", "llama", "llama", "bytelevel", agreement=0.6)
    vocab = NudgeEngine(pair[0], enforce_eager=True, num_blocks=4).base.config.vocab_size
    return NudgeEngine, pair, vocab


def tree_commit(tree: Path) -> str:
    """The checkout's short commit (git), or what a `git archive` copy recorded in COMMIT, or the folder name."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except OSError:
        pass
    marker = tree / "COMMIT"
    return marker.read_text().strip() if marker.is_file() else tree.name


@contextlib.contextmanager
def noop_forwards(vocab: int):
    """ModelRunner.forward returns a fixed logits row per wanted row: one token wins clearly (the
    base writes and accepts every draft, so each nudged round drafts k and emits k + 1)."""
    from nudge_engine.model.model_runner import ModelRunner
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


def nudge_params(config: str):
    from nudge_engine.engine.sampling_params import NudgeParams
    if config == "base alone":
        return NudgeParams(gamma=0.0, draft_tokens=0, adaptive_drafting=False)
    if config == "nudged default":
        return NudgeParams(gamma=GAMMA, draft_tokens=DRAFTS, adaptive_drafting=True)
    return NudgeParams(gamma=GAMMA, draft_tokens=int(config.rsplit("=", 1)[1]), adaptive_drafting=False)


def make_engine(engine_cls, pair, n: int, config: str, rounds: int, eager: bool, fused: bool = True,
                device="cpu"):
    blocks = n * (-(-(PROMPT_LEN + (rounds + 8) * (DRAFTS + 1) + 8) // 16) + 1)
    engine = engine_cls(pair[0], None if config == "base alone" else pair[1], device=device, enforce_eager=eager,
                        max_num_seqs=n, num_blocks=blocks, max_num_batched_tokens=max(4096, n * 32),
                        draft_tokens=DRAFTS)
    if not fused and engine.nudger is not None:
        engine.nudger.draft_graphs = None
    return engine


def time_rounds(engine, n: int, rounds: int, config: str, keep: bool = False, device=None) -> tuple[float, float]:
    """(median wall seconds, median CPU seconds of this thread) per engine.step() over `rounds` decode
    rounds of n requests (keep: leave them running). On a shared machine the CPU time is the steadier
    measure of the host's work: it leaves out the time the thread waited for a core."""
    from nudge_engine.engine.sampling_params import SamplingParams
    max_tokens = (rounds * (2 if keep else 1) + 8) * (DRAFTS + 1)
    for r in range(n):
        engine.add_request([5 + (r + i) % 50 for i in range(PROMPT_LEN)],
                           SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True), nudge_params(config))
    for _ in range(3):   # prefill and warm-up
        engine.step()
    cuda = device is not None and device.type == "cuda"
    times, cpu = [], []
    for _ in range(rounds):
        if cuda:
            torch.cuda.synchronize(device)
        t0, c0 = time.perf_counter(), time.thread_time()
        engine.step()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - c0)
    if not keep:
        drain(engine)
    return statistics.median(times), statistics.median(cpu)


def drain(engine) -> None:
    for rid in list(engine.requests):
        engine.abort(rid)
    assert engine.pools_all_free()


def noop_rows(quick: bool) -> list[dict]:
    """One table of this process's engine: per (requests, config) ms and host reads per round by mode."""
    engine_cls, pair, vocab = load_tree()
    rows = []
    with noop_forwards(vocab):
        for n in REQUESTS:
            rounds = rounds_for(n, quick)
            for config in CONFIGS:
                row = {"requests": n, "config": config}
                modes = [(m, m == "eager", True) for m in MODES] + ([(PER_PASS, False, False)]
                                                                    if config == "nudged k=4" else [])
                for mode, eager, fused in modes:
                    engine = make_engine(engine_cls, pair, n, config, rounds, eager, fused)
                    wall, cpu = time_rounds(engine, n, rounds, config)
                    row[f"{mode} ms"], row[f"{mode} cpu ms"] = 1e3 * wall, 1e3 * cpu
                    row[f"{mode} reads"] = engine.stats.host_reads / max(engine.stats.rounds / n, 1)
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def interleaved(trees: dict[str, Path], repeats: int, quick: bool) -> dict[str, list[list[dict]]]:
    """{label: [one table per repeat]}: worker processes, the trees' order alternating per repeat."""
    runs: dict[str, list[list[dict]]] = {label: [] for label in trees}
    labels = list(trees)
    for r in range(repeats):
        for label in (labels if r % 2 == 0 else labels[::-1]):
            cmd = [sys.executable, "-m", "benchmarks.bench_host_round", "--worker", "--tree", str(trees[label])]
            out = subprocess.run(cmd + (["--quick"] if quick else []), cwd=hardware.ROOT, capture_output=True,
                                 text=True, check=True)
            runs[label].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"repeat {r + 1}/{repeats}: {label} done", flush=True)
    return runs


def median_table(tables: list[list[dict]]) -> list[dict]:
    out = []
    for cells in zip(*tables):
        row = {"requests": cells[0]["requests"], "config": cells[0]["config"]}
        for key in cells[0]:
            if key not in row:
                row[key] = statistics.median(c[key] for c in cells)
        out.append(row)
    return out


def side_by_side(before: list[dict], after: list[dict]) -> list[dict]:
    rows = []
    for b, a in zip(before, after):
        row = {"requests": a["requests"], "config": a["config"]}
        for mode in MODES:
            row[f"{mode} before ms"] = b[f"{mode} ms"]
            row[f"{mode} after ms"] = a[f"{mode} ms"]
            row[f"{mode} after / before"] = a[f"{mode} ms"] / b[f"{mode} ms"]
            row[f"{mode} after cpu ms"] = a[f"{mode} cpu ms"]
        row["after host reads/round"] = a["eager reads"]
        rows.append(row)
    return rows


def gpu_table(pair, device, quick: bool) -> list[dict]:
    from nudge_engine.engine import NudgeEngine
    rows = []
    rounds = 30 if quick else 80
    for config in ("base alone", "nudged k=4"):
        row = {"requests": 1, "config": config}
        for mode, eager in (("eager", True), ("graphs", False)):
            engine = NudgeEngine(pair[0], pair[1] if config != "base alone" else None, device=device,
                                 dtype="bfloat16", enforce_eager=eager, max_num_seqs=8, kv_cache_bytes=512 << 20)
            before_tokens = engine.stats.base_tokens + engine.stats.nudger_tokens
            per_round = time_rounds(engine, 1, rounds, config, device=device)[0]
            tokens = engine.stats.base_tokens + engine.stats.nudger_tokens - before_tokens
            row[f"{mode} ms/token"] = 1e3 * per_round * max(engine.stats.rounds, 1) / max(tokens, 1)
        row["graphs / eager"] = row["graphs ms/token"] / row["eager ms/token"]
        rows.append(row)
        print(row, flush=True)
    return rows


def markdown(rows: list[dict], title: str, note: str = "") -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [f"# {title}", ""] + ([note, ""] if note else [])
    lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k, "-")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="real forwards on CUDA, batch 1, eager vs CUDA graphs")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--before", default=None, help="another checkout's engine, timed interleaved beside this one")
    ap.add_argument("--repeats", type=int, default=5, help="worker runs per tree with --before")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tree", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.tree:
        sys.path.insert(0, str(Path(args.tree).resolve()))
    device = hardware.setup_device("cuda" if args.gpu else "cpu")
    if args.worker:
        print(json.dumps(noop_rows(args.quick)))
        return 0
    from benchmarks.report import write_results
    env = hardware.environment(device) | {"load": os.getloadavg()}
    label = hardware.device_name(device)
    if args.gpu:
        from nudge_engine.testing import make_tiny_pair
        with tempfile.TemporaryDirectory() as tmp:
            pair = make_tiny_pair(Path(tmp) / "pair", "llama", "llama", "bytelevel", agreement=0.6,
                                  hidden_size=512, num_heads=8, num_kv_heads=2, num_layers=8)
            rows = gpu_table(pair, device, args.quick)
        md = markdown(rows, f"ms/token at batch 1, eager vs CUDA graphs ({label})")
        suite = "graphs_batch1"
    elif args.before:
        before = Path(args.before).resolve()
        runs = interleaved({"before": before, "after": hardware.ROOT}, args.repeats, args.quick)
        rows = side_by_side(median_table(runs["before"]), median_table(runs["after"]))
        env |= {"before_tree": str(before), "before_commit": tree_commit(before), "repeats": args.repeats,
                "runs": runs}
        md = markdown(rows, f"host ms per round, model forwards as no-ops: before ({env['before_commit']}) and after "
                            f"({env['commit']}), {label}",
                      f"Medians of {args.repeats} worker runs per tree, interleaved (the trees alternate), each the "
                      "median round of its run; wall ms, and the thread's CPU ms (what the host worked, without "
                      "waiting for a core on a shared machine). eager: the CPU engine's default; replay: the "
                      f"CUDA-graph path's emulation on the CPU. Load average at the start: {env['load']}.")
        suite = "host_round"
    else:
        rows = median_table([noop_rows(args.quick)])
        md = markdown(rows, f"host ms per round, model forwards as no-ops, eager vs replay emulation ({label})")
        suite = "host_round"
    print(md)
    paths = write_results(args.out, device, suite, "tiny", {"env": env, "rows": rows}, md)
    print("wrote", *paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
