"""Where the host's time goes in one engine round: cProfile over rounds with the model forwards as no-ops.

For 1 / 16 / 256 requests and each configuration of bench_host_round (the base alone, nudging without
drafts, nudging with k = 4 drafts, the default adaptive plan), eager (the CPU engine's default): the
median ms per round without the profiler, then a profiled run and its top entries by own time
(`tottime`: time in the function itself, callees excluded). The profiler slows a round down (it
hooks every Python call), so its totals are larger than the unprofiled median; the shares are what
to read.

    python -m benchmarks.profile_host_round [--tree DIR] [--top 12] [--out DIR]

--tree profiles the engine of another checkout (its nudge_engine/ with a built C++ core), so a
profile before a change can be taken from the same script; results name that tree's commit.
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import hardware  # noqa: E402


def profile_cell(engine_cls, pair, n: int, config: str, rounds: int, top: int, tree: Path) -> dict:
    from benchmarks import bench_host_round as bhr
    rounds //= 2   # timed, then profiled: both within the tiny models' context
    engine = bhr.make_engine(engine_cls, pair, n, config, 2 * rounds, eager=True)
    ms, cpu_ms = (1e3 * t for t in bhr.time_rounds(engine, n, rounds, config, keep=True))
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(rounds):
        engine.step()
    prof.disable()
    bhr.drain(engine)
    stats = pstats.Stats(prof)
    total = stats.total_tt
    entries = []
    for (file, line, func), (cc, nc, tt, ct, _) in sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:top]:
        entries.append({"function": _where(file, line, func, tree), "calls_per_round": nc / rounds,
                        "tottime_ms_per_round": 1e3 * tt / rounds, "cumtime_ms_per_round": 1e3 * ct / rounds,
                        "share": tt / total if total else 0.0})
    return {"requests": n, "config": config, "ms_per_round": ms, "cpu_ms_per_round": cpu_ms, "profiled_ms_per_round": 1e3 * total / rounds,
            "top": entries}


def _where(file: str, line: int, func: str, tree: Path) -> str:
    if file == "~":
        return func   # a builtin: {method 'x' of ...}
    path = Path(file)
    for root in (tree, Path(sys.prefix)):
        try:
            return f"{path.relative_to(root)}:{line}({func})"
        except ValueError:
            pass
    return f"{path.name}:{line}({func})"


def markdown(cells: list[dict], title: str) -> str:
    lines = [f"# {title}", ""]
    for c in cells:
        lines += [f"## {c['requests']} requests, {c['config']}: {c['ms_per_round']:.3f} ms/round, "
                  f"{c['cpu_ms_per_round']:.3f} CPU ms (profiled {c['profiled_ms_per_round']:.3f})", "",
                  "| function | calls/round | own ms/round | cum ms/round | share of own time |",
                  "|---|---:|---:|---:|---:|"]
        for e in c["top"]:
            fn = e["function"].replace("|", "\\|")
            lines.append(f"| `{fn}` | {e['calls_per_round']:.1f} | {e['tottime_ms_per_round']:.3f} | "
                         f"{e['cumtime_ms_per_round']:.3f} | {e['share']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", default=None, help="profile this checkout's engine (default: this one)")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    tree = Path(args.tree).resolve() if args.tree else hardware.ROOT
    if args.tree:
        sys.path.insert(0, str(tree))
    from benchmarks import bench_host_round as bhr
    from benchmarks.report import write_results
    device = hardware.setup_device("cpu")
    engine_cls, pair, vocab = bhr.load_tree()
    commit = bhr.tree_commit(tree)
    cells = []
    with bhr.noop_forwards(vocab):
        for n in bhr.REQUESTS:
            for config in bhr.CONFIGS:
                rounds = bhr.rounds_for(n, args.quick)
                cells.append(profile_cell(engine_cls, pair, n, config, rounds, args.top, tree))
                print(f"{n} {config}: {cells[-1]['ms_per_round']:.3f} ms/round", flush=True)
    env = hardware.environment(device) | {"commit": commit, "tree": str(tree), "load": os.getloadavg()}
    md = markdown(cells, f"Host time per round by function, model forwards as no-ops, eager, engine at {commit} "
                         f"({hardware.device_name(device)}; cProfile, top {args.top} by own time; load average "
                         f"{', '.join(f'{x:.1f}' for x in env['load'])})")
    paths = write_results(args.out, device, "host_round_profile", "tiny", {"env": env, "cells": cells}, md)
    print("wrote", *paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
