"""GPU check: tensor parallel N (NCCL on CUDA, gloo on the CPU) against one process, run by gpu_check.sh.

Greedy nudged generation on tiny pairs (float32, heads that divide N) must give the same tokens and
sources as one process's eager engine with the base sharded over N ranks, for the nudger on rank 0
and sharded, both eagerly and with decode graphs per rank (CUDA graphs with the NCCL collectives
captured inside them; the replay emulation on the CPU); --size 1 compares graphs with eager on the
one GPU. Afterwards no worker process may be left. With --size 2 or more: two tensor-parallel engines
alive at once in this process (each its own NCCL group) give the same tokens as one at a time, and a
worker killed in the middle of a pass ends the engine with WorkerDiedError within the collective
time-out, leaving no process.
python benchmarks/tp_check.py --size 2 [--device cpu]
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time

import torch

from nudge_engine.distributed.launch import WorkerDiedError
from nudge_engine.engine import NudgeEngine
from nudge_engine.engine.sampling_params import SamplingParams
from nudge_engine.testing import make_tiny_pair

KV_CACHE_BYTES = 64 << 20   # fixed: sizing from free memory would differ between the runs
MAX_NUM_SEQS = 8            # captured batch sizes 1, 2, 4, 8: short captures; 3 and 4 prompts pad
FAMILIES = ("llama", "gemma2", "olmo2", "qwen2")
PROMPTS = [[5 + i for i in range(n)] for n in (1, 17, 40, 3)]
PARAMS = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)


def open_engine(base, nudger, device: str, size: int, placement: str, graphs: bool) -> NudgeEngine:
    return NudgeEngine(base, nudger, device=device, kv_cache_bytes=KV_CACHE_BYTES, tensor_parallel_size=size,
                       nudger_placement=placement, enforce_eager=not graphs, max_num_seqs=MAX_NUM_SEQS)


def generate(base, nudger, device: str, size: int, placement: str, graphs: bool = False) -> list:
    engine = open_engine(base, nudger, device, size, placement, graphs)
    procs = list(engine._tp.procs) if engine._tp is not None else []
    try:
        if graphs and engine.base.graphs is None:
            raise RuntimeError("graphs asked for, but the engine captured none")
        outs = engine.generate(PROMPTS, PARAMS)
    finally:
        engine.close()
    if any(p.is_alive() for p in procs):
        raise RuntimeError("a tensor-parallel worker outlived engine.close()")
    return [(o.token_ids, o.sources) for o in outs]


def side_by_side_check(pairs: list, device: str, size: int, want: list) -> bool:
    """Two tensor-parallel engines at once (each its own group and workers), stepped in turn."""
    engines = [open_engine(b, n, device, size, "rank0", graphs=True) for b, n in pairs]
    procs = [p for e in engines for p in e._tp.procs]
    try:
        reqs = [[e.requests[e.add_request(p, PARAMS)] for p in PROMPTS] for e in engines]
        while any(e.has_unfinished() for e in engines):
            for e in engines:
                e.step()
        got = [[(r.result().token_ids, r.result().sources) for r in rs] for rs in reqs]
    finally:
        for e in engines:
            e.close()
    ok = got == want and not any(p.is_alive() for p in procs)
    print(f"two tensor parallel {size} engines at once on {device} (graphs): "
          f"{'same' if got == want else 'DIFFERENT'} tokens as one at a time, processes left: "
          f"{[p.pid for p in procs if p.is_alive()] or 'none'}")
    return ok


def kill_check(base, device: str, size: int) -> bool:
    """A worker killed after it got a pass's inputs: the pass raises, the engine closes, nothing is left."""
    os.environ.setdefault("NUDGE_TP_TIMEOUT_S", "60")
    engine = NudgeEngine(base, device=device, kv_cache_bytes=KV_CACHE_BYTES, tensor_parallel_size=size,
                         enforce_eager=True)   # the kill comes in an eager pass's forward
    procs, runner = list(engine._tp.procs), engine.base.runner
    inner = runner.inner.forward

    def killed(step, rows):
        os.kill(procs[-1].pid, signal.SIGKILL)
        procs[-1].join(30)
        return inner(step, rows)

    runner.inner.forward = killed
    t0, raised = time.perf_counter(), False
    try:
        engine.generate([[5, 6, 7]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    except WorkerDiedError:
        raised = True
    finally:
        engine.close()
    left = [p.pid for p in procs if p.is_alive()]
    print(f"worker killed mid-pass on {device}: {'WorkerDiedError' if raised else 'NO ERROR'} after "
          f"{time.perf_counter() - t0:.1f} s, processes left: {left or 'none'}")
    return raised and not left


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    if args.device.startswith("cuda") and torch.cuda.device_count() < args.size:
        print(f"tensor parallel {args.size} needs {args.size} GPUs, this machine has {torch.cuda.device_count()}")
        return 1
    failures = 0
    runs = [(args.size, placement, graphs) for graphs in (False, True) for placement in ("rank0", "tensor")]
    if args.size == 1:
        runs = [(1, "rank0", True)]   # graphs against eager on the one GPU
    with tempfile.TemporaryDirectory() as tmp:
        firsts = []
        for family in FAMILIES:
            base, nudger = make_tiny_pair(f"{tmp}/{family}", family, family, "bytelevel", agreement=0.6,
                                          hidden_size=128, num_heads=4, num_kv_heads=2)
            want = generate(base, nudger, args.device, 1, "rank0")
            firsts.append(((base, nudger), want))
            for size, placement, graphs in runs:
                got = generate(base, nudger, args.device, size, placement, graphs)
                ok = got == want
                failures += not ok
                nudged = sum(s == "nudger" for _, sources in got for s in sources)
                print(f"{family:7s} tensor parallel {size} ({placement:6s}, {'graphs' if graphs else 'eager '}) vs "
                      f"1 eager on {args.device}: {'same' if ok else 'DIFFERENT'} tokens and sources "
                      f"({nudged} nudged tokens)")
        if args.size > 1:
            failures += not side_by_side_check([p for p, _ in firsts[:2]], args.device, args.size,
                                               [w for _, w in firsts[:2]])
            failures += not kill_check(base, args.device, args.size)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
