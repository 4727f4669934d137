"""GPU check: tensor parallel N (NCCL on CUDA, gloo on the CPU) against one process, run by gpu_check.sh.

Greedy nudged generation on tiny pairs (float32, heads that divide N) must give the same tokens and
sources with the base sharded over N ranks as in one process, for the nudger on rank 0 and sharded;
afterwards no worker process may be left. With --size 2 or more, a worker killed in the middle of
a pass must end the engine with WorkerDiedError within the collective time-out, leaving no process.
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
FAMILIES = ("llama", "gemma2", "olmo2", "qwen2")


def generate(base, nudger, device: str, size: int, placement: str) -> list:
    engine = NudgeEngine(base, nudger, device=device, kv_cache_bytes=KV_CACHE_BYTES, tensor_parallel_size=size,
                         nudger_placement=placement)
    procs = list(engine._tp.procs) if engine._tp is not None else []
    try:
        prompts = [[5 + i for i in range(n)] for n in (1, 17, 40, 3)]
        outs = engine.generate(prompts, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
    finally:
        engine.close()
    if any(p.is_alive() for p in procs):
        raise RuntimeError("a tensor-parallel worker outlived engine.close()")
    return [(o.token_ids, o.sources) for o in outs]


def kill_check(base, device: str, size: int) -> bool:
    """A worker killed after it got a pass's inputs: the pass raises, the engine closes, nothing is left."""
    os.environ.setdefault("NUDGE_TP_TIMEOUT_S", "60")
    engine = NudgeEngine(base, device=device, kv_cache_bytes=KV_CACHE_BYTES, tensor_parallel_size=size)
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
    with tempfile.TemporaryDirectory() as tmp:
        for family in FAMILIES:
            base, nudger = make_tiny_pair(f"{tmp}/{family}", family, family, "bytelevel", agreement=0.6,
                                          hidden_size=128, num_heads=4, num_kv_heads=2)
            want = generate(base, nudger, args.device, 1, "rank0")
            for placement in ("rank0", "tensor"):
                got = generate(base, nudger, args.device, args.size, placement)
                ok = got == want
                failures += not ok
                nudged = sum(s == "nudger" for _, sources in got for s in sources)
                print(f"{family:7s} tensor parallel {args.size} ({placement:6s}) vs 1 on {args.device}: "
                      f"{'same' if ok else 'DIFFERENT'} tokens and sources ({nudged} nudged tokens)")
        if args.size > 1:
            failures += not kill_check(base, args.device, args.size)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
