"""Phase times of a round for the draft policy, taken without a sync of their own.

On the CPU a phase's host time is its cost. On CUDA the draft passes only launch (their picks stay
on the device), so host time would credit the whole round to the verify pass and tell the policy
that drafts are free. There each mark also records a CUDA event; the walk's one host read waits for
every kernel before it, so by then the events are complete and their elapsed time is the device time
of each phase, read without another sync.
"""
from __future__ import annotations

import time
from typing import NamedTuple

import torch


class Mark(NamedTuple):
    host_s: float                 # time.perf_counter() at the mark
    event: object | None          # torch.cuda.Event recorded at the mark (CUDA only)


class RoundClock:
    def __init__(self, device: torch.device):
        self.use_events = device.type == "cuda"

    def mark(self) -> Mark:
        event = None
        if self.use_events:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        return Mark(time.perf_counter(), event)

    @staticmethod
    def between(start: Mark, end: Mark, host_end: Mark | None = None) -> float:
        """Seconds from start to end: device time when both carry events and end's is complete,
        else host time from start to host_end (default end)."""
        if start.event is not None and end.event is not None and end.event.query():
            return start.event.elapsed_time(end.event) / 1e3
        return (host_end or end).host_s - start.host_s
