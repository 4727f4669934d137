"""How many tokens the nudger drafts for a request in BASE mode, round by round.

The output never depends on the draft length (NUDGING.md section 5 is exact for every k), so
the engine may pick it freely for speed. A round that drafts k tokens costs about 1 + k * c base
forwards (c = a nudger pass over a base pass) and yields (1 - a^(k+1)) / (1 - a) tokens when each
draft is accepted with probability a. The policy picks the k <= the request's draft_tokens that
maximizes tokens per unit of time, from the request's own acceptance history (so a seeded request
behaves the same whatever it is batched with) and the engine's measured cost ratio. A request whose
drafts do not pay stops drafting, but probes again now and then, since agreement changes with the text.
"""
from __future__ import annotations

from dataclasses import dataclass

ACCEPT_PRIOR, REJECT_PRIOR = 1.0, 1.0   # start at a = 0.5: one cheap draft until the request shows more
HISTORY_DECAY = 0.8                      # per round: acceptance is a property of the recent text
PROBE_EVERY = 8                          # BASE rounds without drafts before drafting once more
COST_DECAY = 0.9


@dataclass
class DraftStats:
    """Per request: exponentially decayed counts of accepted and rejected BASE-mode drafts."""

    accepted: float = ACCEPT_PRIOR
    rejected: float = REJECT_PRIOR
    rounds_without_draft: int = 0

    @property
    def accept_rate(self) -> float:
        return self.accepted / (self.accepted + self.rejected)

    def observe(self, accepted: int, rejected: int) -> None:
        self.accepted = self.accepted * HISTORY_DECAY + accepted
        self.rejected = self.rejected * HISTORY_DECAY + rejected


def expected_speedup(k: int, accept_rate: float, cost_ratio: float) -> float:
    a = min(accept_rate, 1 - 1e-6)
    return (1 - a ** (k + 1)) / (1 - a) / (1 + k * cost_ratio)


class DraftPolicy:
    def __init__(self, cost_ratio: float):
        self.static_cost_ratio = cost_ratio  # from the models' sizes
        self.cost_ratio = cost_ratio         # one nudger pass over one base pass, measured as the engine runs

    def choose(self, stats: DraftStats, max_k: int, measured: bool = True) -> int:
        """measured=False uses the static cost ratio: a sampled request's random draws depend on its
        draft lengths, so those must not depend on timings, or a seed would not fix the output."""
        if max_k <= 0:
            return 0
        c = self.cost_ratio if measured else self.static_cost_ratio
        best = max(range(max_k + 1), key=lambda k: expected_speedup(k, stats.accept_rate, c))
        if best == 0 and stats.rounds_without_draft >= PROBE_EVERY:
            return 1
        return best

    def observe_pass_times(self, nudger_pass_s: float, base_pass_s: float) -> None:
        if nudger_pass_s > 0 and base_pass_s > 0:
            measured = nudger_pass_s / base_pass_s
            self.cost_ratio = COST_DECAY * self.cost_ratio + (1 - COST_DECAY) * measured
