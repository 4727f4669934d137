"""Timing helpers: a log with elapsed seconds and a time budget, a synced timer, robust statistics."""
from __future__ import annotations

import contextlib
import math
import statistics
import time

import torch

from .hardware import sync


class Log:
    """Prints with elapsed seconds; keeps the lines for the JSON. `budget_s`: the run's time budget
    (optional parts check `left()` and are skipped, with a note, when it runs short)."""

    def __init__(self, budget_s: float | None = None):
        self.t0 = time.perf_counter()
        self.lines: list[str] = []
        self.budget_s = budget_s
        self.skipped: list[str] = []

    def left(self) -> float:
        if self.budget_s is None:
            return float("inf")
        return self.budget_s - (time.perf_counter() - self.t0)

    def skip(self, what: str) -> None:
        self.skipped.append(what)
        self(f"skipped (time budget): {what}")

    def __call__(self, msg: str) -> None:
        line = f"[{time.perf_counter() - self.t0:6.1f}s] {msg}"
        self.lines.append(line)
        print(line, flush=True)


@contextlib.contextmanager
def timed(device: torch.device):
    box = {}
    sync(device)
    t0 = time.perf_counter()
    yield box
    sync(device)
    box["s"] = time.perf_counter() - t0


def median(xs: list[float]) -> float:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return statistics.median(xs) if xs else float("nan")


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(x for x in xs if x is not None and not math.isnan(x))
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)
