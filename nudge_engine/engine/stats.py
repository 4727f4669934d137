"""Engine-wide counters (the server exports them as Prometheus metrics)."""
from __future__ import annotations

from dataclasses import dataclass

from .request import Source


@dataclass
class EngineStats:
    rounds: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    base_tokens: int = 0
    nudger_tokens: int = 0
    handoffs: int = 0
    preemptions: int = 0
    failed_requests: int = 0      # requests ended alone because their own work raised
    host_reads: int = 0           # device-to-host reads of the rounds (pairing/host_read.py)

    def record_round(self, drafted: int, accepted: int, sources: list[int], mode_changed: bool) -> None:
        self.rounds += 1
        self.drafted_tokens += drafted
        self.accepted_tokens += accepted
        nudged = sum(1 for s in sources if s == Source.NUDGER)
        self.nudger_tokens += nudged
        self.base_tokens += len(sources) - nudged
        self.handoffs += int(mode_changed)
