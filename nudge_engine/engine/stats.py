"""Engine-wide counters (the server exports them as Prometheus metrics)."""
from __future__ import annotations

from dataclasses import dataclass


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

    def record_rounds(self, rounds: int, drafted: int, accepted: int, nudger_tokens: int, base_tokens: int,
                      handoffs: int) -> None:
        """One step's request rounds together (pairing/token.py adds them up as it applies them)."""
        self.rounds += rounds
        self.drafted_tokens += drafted
        self.accepted_tokens += accepted
        self.nudger_tokens += nudger_tokens
        self.base_tokens += base_tokens
        self.handoffs += handoffs
