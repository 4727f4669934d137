"""CPU threads: how many torch uses, and how its OpenMP threads wait (README: CPU threads).

Two things decide how fast the engine decodes on a CPU:
  - the OpenMP wait policy. By default an OpenMP thread that finishes its share of an operation spins
    for a while before it sleeps. A decode step is hundreds of small operations, so with another job
    on the same cores the spinning threads take the cores the others need: SmolLM2 decoded at 0.8 tok/s
    with two threads against 8 with one, on a 2-core machine with other work running. With
    OMP_WAIT_POLICY=PASSIVE they sleep at once, and two threads decoded at 18-20 tok/s there.
    The OpenMP runtime reads the policy once, when torch loads it: `prefer_passive_wait` sets it
    (unless the environment already does) while torch is not yet imported. `import nudge_engine` and
    the `nudge` command call it first thing; a program that imports torch before nudge_engine keeps
    its runtime's policy (set OMP_WAIT_POLICY=PASSIVE in its environment instead).
  - the thread count: by default every core this process may use (os.sched_getaffinity: a container
    or `taskset` limits it), never more than torch would use by itself; `threads=` / `--threads` sets it.
"""
from __future__ import annotations

import os
import sys

WAIT_POLICY_ENV = "OMP_WAIT_POLICY"
PASSIVE = "PASSIVE"


def prefer_passive_wait() -> bool:
    """Sets OMP_WAIT_POLICY=PASSIVE unless the environment sets it; only effective before torch is
    imported (returns whether it still could be)."""
    if "torch" in sys.modules:
        return False
    os.environ.setdefault(WAIT_POLICY_ENV, PASSIVE)
    return True


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):   # no sched_getaffinity (macOS, Windows)
        return max(1, os.cpu_count() or 1)


def default_threads(current: int) -> int:
    """The torch thread count without a setting: torch's own (current), but no more than the usable cores."""
    return max(1, min(current, usable_cores()))


def set_threads(threads: int | None) -> int:
    """torch's intra-op thread count: `threads`, or default_threads() when None. -> the count set."""
    import torch
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise ValueError(f"threads must be an integer >= 1 (or None for the default), got {threads!r}")
    n = threads if threads is not None else default_threads(torch.get_num_threads())
    if n != torch.get_num_threads():
        torch.set_num_threads(n)
    return n
