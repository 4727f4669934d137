"""A closed-loop model of the token path's rounds, to drive the draft plan (engine/draft_policy.py)
with timings chosen by a test: the true costs of a machine, and what a loaded machine adds to the
timings the plan sees (a pass descheduled for 50 ms, a burst of slow passes).

Each simulated request walks NUDGING.md section 5 in distribution: in BASE mode a position nudges
with probability `nudge`, else a draft is accepted with probability `accept` (the first rejection
or the bonus emits the base's token); in NUDGE mode the nudger's first token is always kept and each
further one while the run goes on (probability `stay`). The plan sees each request's history as the
engine keeps it (pairing/token.py _observe_drafts / _observe_nudging) and the round's timings as
pairing/token.py measures them; the speed is emitted tokens over the TRUE seconds (what the outliers
cost is the machine's, the same whatever the plan; what the plan chooses because of them is its own).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable

from nudge_engine.engine.draft_policy import DraftPolicy, DraftStats, PlanEntry

ADAPTIVE = None   # policy argument of run(): the plan decides; an int: every request drafts that many


@dataclass
class Machine:
    """True seconds of a round's parts."""
    verify_pass: float
    verify_token: float
    draft_pass: float
    draft_token: float
    overhead: float
    padded: bool = True   # the torch backend pads a mixed verify pass (the CPU engine)

    def round_s(self, ks: list[int], pending: list[int]) -> tuple[float, float, int, int]:
        """(draft seconds, verify seconds, draft tokens, verify tokens) of a round whose requests draft ks."""
        passes = max(ks)
        drafted = sum(p + k - 1 for k, p in zip(ks, pending) if k > 0)
        verify_tokens = len(ks) * (1 + passes) if self.padded else len(ks) + sum(ks)
        draft_s = self.draft_pass * passes + self.draft_token * drafted if passes else 0.0
        return draft_s, self.verify_pass + self.verify_token * verify_tokens, drafted, verify_tokens


@dataclass
class Workload:
    batch: int
    accept: float          # a BASE-mode draft is the base's own token
    nudge: float           # a BASE-mode position where the base is unsure
    stay: float = 0.6      # a nudge run goes on for one more token
    cap: int = 4           # draft_tokens


@dataclass
class _Request:
    stats: DraftStats = field(default_factory=DraftStats)
    nudging: bool = False
    run: int = 0           # nudger tokens in the current nudge run
    lag: int = 0           # tokens written since the nudger last ran for this request (lazy catch-up)


# Disturbances: (round index, draft s, verify s, overhead s) -> the seconds the plan is told.
Noise = Callable[[int, float, float, float], tuple[float, float, float]]


def quiet(_r: int, draft_s: float, verify_s: float, overhead_s: float) -> tuple[float, float, float]:
    return draft_s, verify_s, overhead_s


def descheduled(every: int, extra_s: float = 0.050, seed: int = 7) -> Noise:
    """About one round in `every`, one of its parts (draft passes, verify pass or the gap before the
    round, at random) waits extra_s for a core. The same rounds for every policy."""
    def noise(r: int, draft_s: float, verify_s: float, overhead_s: float) -> tuple[float, float, float]:
        rng = random.Random(seed * 1_000_003 + r)
        if rng.random() >= 1 / every:
            return draft_s, verify_s, overhead_s
        where = rng.randrange(3)
        if where == 0 and draft_s > 0:
            return draft_s + extra_s, verify_s, overhead_s
        if where == 2:
            return draft_s, verify_s, overhead_s + extra_s
        return draft_s, verify_s + extra_s, overhead_s
    return noise


def bursts(start_every: int, length: int, factor: float) -> Noise:
    """Every start_every rounds, `length` rounds whose parts all take `factor` times longer."""
    def noise(r: int, draft_s: float, verify_s: float, overhead_s: float) -> tuple[float, float, float]:
        if r % start_every < length:
            return draft_s * factor, verify_s * factor, overhead_s * factor
        return draft_s, verify_s, overhead_s
    return noise


def both(*noises: Noise) -> Noise:
    def noise(r: int, draft_s: float, verify_s: float, overhead_s: float) -> tuple[float, float, float]:
        for n in noises:
            draft_s, verify_s, overhead_s = n(r, draft_s, verify_s, overhead_s)
        return draft_s, verify_s, overhead_s
    return noise


def _walk(req: _Request, k: int, w: Workload, rng: random.Random) -> int:
    """One request's round with k drafts -> tokens written; its mode and history updated as the engine does."""
    was_nudging, nudging, run = req.nudging, req.nudging, req.run
    tokens = accepted = 0
    for j in range(k + 1):
        if j == k:                                   # no draft here
            if not nudging:
                if rng.random() < w.nudge:
                    nudging, run = True, 0           # the nudger writes this position next round
                else:
                    tokens += 1                      # the bonus token
            break
        if nudging:
            if run > 0 and rng.random() >= w.stay:   # a word start where the base takes over
                nudging, run = False, 0
                tokens += 1                          # the base's own token there
                break
            run += 1
        elif rng.random() < w.nudge:
            nudging, run = True, 1                   # the draft is the nudged token
        elif rng.random() >= w.accept:
            tokens += 1                              # the base's correction
            break
        accepted += 1
        tokens += 1
    req.nudging, req.run = nudging, run
    req.lag = 0 if k else req.lag + tokens
    if was_nudging:
        if k:
            req.stats.observe_nudge(max(accepted - 1, 0), int(accepted < k))
    elif k == 0:
        req.stats.rounds_without_draft += 1
    else:
        req.stats.rounds_without_draft = 0
        req.stats.observe(accepted, int(accepted < k))
    return tokens


def run(policy_k: int | None, machine: Machine, w: Workload, rounds: int = 1500, noise: Noise = quiet,
        seed: int = 0, policy: DraftPolicy | None = None) -> float:
    """Tokens per true second over `rounds` rounds of a full batch. policy_k: ADAPTIVE (the plan) or a
    fixed draft count; policy: the plan's DraftPolicy (default: a fresh one, padded as the machine)."""
    rng = random.Random(seed)
    plan = policy or DraftPolicy(cost_ratio=machine.draft_pass / machine.verify_pass, padded_queries=machine.padded)
    population = DraftStats()
    reqs = [_Request() for _ in range(w.batch)]
    for r in reqs:
        r.stats.start_from(population)
    tokens, seconds = 0, 0.0
    for i in range(rounds):
        caps = [max(w.cap, 1) if r.nudging else w.cap for r in reqs]
        pending = [r.lag + 1 for r in reqs]
        if policy_k is ADAPTIVE:
            ks = plan.plan_round([PlanEntry(stats=r.stats, cap=c, nudging=r.nudging, pending=p)
                                  for r, c, p in zip(reqs, caps, pending)])
        else:
            ks = [max(policy_k, 1) if r.nudging else policy_k for r in reqs]
        emitted = sum(_walk(r, k, w, rng) for r, k in zip(reqs, ks))
        draft_s, verify_s, draft_tokens, verify_tokens = machine.round_s(ks, pending)
        seen = noise(i, draft_s, verify_s, machine.overhead)
        plan.observe_round(seen[0], max(ks), draft_tokens, seen[1], verify_tokens, seen[2],
                           uniform=min(ks) == max(ks), emitted=emitted)
        tokens += emitted
        seconds += draft_s + verify_s + machine.overhead
    return tokens / seconds


def speeds(machine: Machine, w: Workload, noise: Noise = quiet, ks=(0, 1, 2, 4), rounds: int = 1500,
           seed: int = 0) -> dict[str, float]:
    """{"k=0": ..., "default": ...}: every policy on the same machine, workload and noise."""
    out = {f"k={k}": run(k, machine, w, rounds, noise, seed) for k in ks}
    out["default"] = run(ADAPTIVE, machine, w, rounds, noise, seed)
    return out


def drafts_timed_short(seen: float) -> Noise:
    """Only `seen` of the draft passes' time is timed as theirs, the rest lands in the verify pass (host
    timing of passes that only launch: what pairing/round_clock.py guards against on CUDA)."""
    def noise(_r: int, draft_s: float, verify_s: float, overhead_s: float) -> tuple[float, float, float]:
        return draft_s * seen, verify_s + draft_s * (1 - seen), overhead_s
    return noise
