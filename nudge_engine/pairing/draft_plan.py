"""The token path's per-round draft plan: which request drafts how many tokens this round.

The engine prepares every request before scheduling; the first `prepare` of a round builds the plan
for all of them at once (engine/draft_policy.py `DraftPolicy.plan_round`), since a round waits for the
nudger passes of whichever request needs the most. Greedy adaptive requests follow the plan; sampled
requests keep a k that depends neither on timings nor on the batch (their seeds must fix their output),
and requests with adaptive drafting off keep their draft_tokens; the plan counts the passes they force.
"""
from __future__ import annotations

from ..engine.draft_policy import DraftPolicy, DraftStats, PlanEntry
from ..engine.request import Mode, Request


class DraftPlanner:
    def __init__(self, policy: DraftPolicy, engine):
        self.policy, self.engine = policy, engine
        self.epoch = 0          # bumped at the end of every round: a new round plans anew
        self._epoch_planned = -1
        self._plan: dict[int, int] = {}
        self.population = DraftStats()   # the planned requests' acceptance, the prior of the next ones

    def next_round(self) -> None:
        self.epoch += 1

    def cap(self, req: Request) -> int:
        """Most drafts this round: never more than the request may still emit (admission checked that
        prompt + max_tokens fits both contexts and pools) nor past the step's token budget."""
        k = max(req.draft_tokens, 1) if req.mode == Mode.NUDGE else req.draft_tokens
        return max(0, min(k, req.params.max_tokens - len(req.output), self.engine.max_num_batched_tokens - 1))

    def planned(self, req: Request) -> bool:
        return req.adaptive_drafting and req.greedy

    def fixed_count(self, req: Request) -> int:
        """Draft count of a request outside the plan (as before the plan existed)."""
        cap = self.cap(req)
        if req.mode == Mode.NUDGE or not req.adaptive_drafting:
            return cap
        return min(self.policy.choose(req.draft_stats, req.draft_tokens, measured=False), cap)

    def count(self, req: Request) -> int:
        if not self.planned(req):
            return self.fixed_count(req)
        if self._epoch_planned != self.epoch or req.id not in self._plan:
            self._replan()
        return self._plan.get(req.id, 0)

    def _replan(self) -> None:
        reqs = [r for r in self.engine.requests.values() if r.nudger_seq is not None]
        entries = []
        for r in reqs:
            if self.planned(r) and r.draft_stats.population is None:
                r.draft_stats.start_from(self.population)
            seq = r.nudger_seq  # lazy catch-up: its first pass computes the output it has not seen
            missing = (len(r.output) - (seq.num_tokens - len(r.nudger_prompt)) if seq.num_tokens
                       else len(r.nudger_prompt) + len(r.output))
            entries.append(PlanEntry(stats=r.draft_stats, cap=self.cap(r), nudging=r.mode == Mode.NUDGE,
                                     fixed=None if self.planned(r) else self.fixed_count(r),
                                     pending=max(seq.num_tokens - seq.num_computed + missing, 1)))
        ks = self.policy.plan_round(entries)
        self._plan = {r.id: k for r, k in zip(reqs, ks)}
        self._epoch_planned = self.epoch
