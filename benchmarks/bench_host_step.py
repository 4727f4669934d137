"""Host-side cost of one decode step of the engine loop, without any model.

One step = Scheduler.schedule() + build_batch() for each model's scheduled sequences +
bookkeeping (mark the scheduled tokens computed, append one sampled token per model).
Two pools (base + nudger), block size 16, prompts of ~128 tokens, all requests decoding.

    .venv/bin/python benchmarks/bench_host_step.py [--steps-scale 1.0]

Prints a markdown table, then the same numbers as JSON on the last line.
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import statistics
import time

from nudge_engine._core import BlockPool, Scheduler, Sequence, build_batch

BLOCK_SIZE = 16
PROMPT_LEN = 128
NUM_MODELS = 2  # base + nudger, as in a nudged engine
REQUEST_COUNTS = (1, 16, 256)
STEPS = {1: 3000, 16: 1500, 256: 300}  # timed steps per size (fewer where a step is slow)
WARMUP_STEPS = 20
SEED = 0


def run(num_requests: int, steps: int) -> dict:
    rng = random.Random(SEED)
    max_len = PROMPT_LEN + 8 + WARMUP_STEPS + steps + 1
    blocks = num_requests * (max_len // BLOCK_SIZE + 2)
    pools = [BlockPool(blocks, BLOCK_SIZE) for _ in range(NUM_MODELS)]
    sched = Scheduler(pools, max_num_seqs=num_requests,
                      max_num_batched_tokens=num_requests * (PROMPT_LEN + 8))
    seqs_of: dict[int, list[Sequence]] = {}
    for r in range(num_requests):
        prompt = [rng.randrange(32000) for _ in range(PROMPT_LEN + rng.randrange(-8, 9))]
        seqs = [Sequence(pool) for pool in pools]
        for seq in seqs:
            seq.append(prompt)
        sched.add_request(r, seqs)
        seqs_of[r] = seqs

    def step() -> tuple[int, int, int, int]:
        t0 = time.perf_counter_ns()
        sched_step = sched.schedule()
        t1 = time.perf_counter_ns()
        ids = sched_step.req_ids
        num_new = sched_step.num_new_tokens
        for m in range(NUM_MODELS):
            build_batch([seqs_of[r][m] for r in ids], num_new[m], BLOCK_SIZE)
        t2 = time.perf_counter_ns()
        for i, r in enumerate(ids):
            token = 1 + r  # stands in for the sampled token
            for m, seq in enumerate(seqs_of[r]):
                seq.set_num_computed(seq.num_computed + num_new[m][i])
                seq.append(token)
        t3 = time.perf_counter_ns()
        return t3 - t0, t1 - t0, t2 - t1, t3 - t2

    step()  # prefill: every prompt in one step (not timed)
    for _ in range(WARMUP_STEPS):
        step()
    gc.collect()
    gc.disable()  # a collection in the middle of a step is noise, not host cost of the core
    try:
        samples = [step() for _ in range(steps)]
    finally:
        gc.enable()
    assert sched.num_running == num_requests and not sched.num_waiting
    for r in range(num_requests):
        sched.finish(r)
    assert all(p.all_free() for p in pools)

    total, sched_ns, build_ns, book_ns = (statistics.median(col) for col in zip(*samples))
    return {
        "requests": num_requests,
        "steps": steps,
        "us_per_step": round(total / 1e3, 2),
        "us_per_request": round(total / 1e3 / num_requests, 3),
        "schedule_us": round(sched_ns / 1e3, 2),
        "build_batch_us": round(build_ns / 1e3, 2),
        "bookkeeping_us": round(book_ns / 1e3, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps-scale", type=float, default=1.0,
                        help="multiply the number of timed steps (e.g. 0.1 for a quick look)")
    args = parser.parse_args()

    results = [run(n, max(10, int(STEPS[n] * args.steps_scale))) for n in REQUEST_COUNTS]

    print(f"Host step cost: {NUM_MODELS} pools, block size {BLOCK_SIZE}, prompts ~{PROMPT_LEN} tokens, "
          f"decode; median per step ({platform.python_implementation()} {platform.python_version()}, "
          f"{platform.machine()})\n")
    print("| requests | us/step | us/request | schedule us | build_batch us (both models) | bookkeeping us |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['requests']} | {r['us_per_step']:.1f} | {r['us_per_request']:.2f} | "
              f"{r['schedule_us']:.1f} | {r['build_batch_us']:.1f} | {r['bookkeeping_us']:.1f} |")
    print(json.dumps({"benchmark": "host_step", "block_size": BLOCK_SIZE, "prompt_len": PROMPT_LEN,
                      "num_models": NUM_MODELS, "results": results}))


if __name__ == "__main__":
    main()
