"""How many tokens the nudger drafts for each request, round by round.

The output never depends on the draft length (NUDGING.md section 5 is exact for every k), so
the engine may pick it freely for speed. A draft of k tokens accepted with probability a per token
yields (1 - a^(k+1)) / (1 - a) tokens per round.

Two deciders:
  - `DraftPolicy.choose(stats, max_k, measured)`: one request alone, from its acceptance history and
    the cost ratio of a nudger pass over a base pass (the text path uses it; so do sampled requests,
    with the static ratio: see below).
  - `DraftPolicy.plan_round(entries)`: the whole round (the token path). A round waits for every
    nudger pass any request in it needs, so its cost is
        overhead + draft(passes = max_i k_i, tokens = sum over passes of the requests in it)
                 + verify(1 pass, tokens = sum_i (1 + k_i))
    with both pass costs measured online (`PassCost`: a decayed least-squares fit of seconds against
    passes and tokens, from the round's own timings: no extra syncs). The plan picks the round's pass
    count K and each request's k <= K that maximize expected emitted tokens per second for the batch.
    A NUDGE-mode request needs at least one nudger pass anyway (the nudger writes its token), which
    makes one pass of drafts nearly free for the others.

Priors: a request starts at a = 0.5 for the per-request decision; a planned request instead starts from
the engine's recent requests (`Population`: the same counts, decayed per observation over every planned
request), worth PRIOR_WEIGHT rounds of its own history, so a short request does not spend its first
rounds learning what the requests before it already showed.

Seeds: a sampled request's random draws depend on its draft lengths, so its k must depend neither on
timings nor on what it is batched with, or a seed would not fix its output. Such requests keep the
per-request decision with the static cost ratio (`fixed` entries in the plan); the plan then counts the
passes they force. Greedy requests follow the plan.
"""
from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass
from typing import Callable

from .. import _core


ACCEPT_PRIOR, REJECT_PRIOR = 1.0, 1.0   # start at a = 0.5: one cheap draft until the request shows more
HISTORY_DECAY = 0.95                     # per observation: acceptance drifts with the text, slowly; a shorter memory
                                         # is too noisy for a plan to act on (tests/draft_sim.py)
PRIOR_WEIGHT = ACCEPT_PRIOR + REJECT_PRIOR
POPULATION_DECAY = 0.98                  # per observation, over all planned requests together
UNIFORM, MIXED = True, False             # a verify pass's shape: every query as long, or not
PROBE_EVERY = 8                          # BASE rounds without drafts before drafting once more
PROBE_GAP_MIN, PROBE_GAP_MAX = 16, 256   # ... in a round with no nudger pass otherwise (growing while drafts fail)
PROBE_MIN_RATE = 0.15                    # ... if its drafts were accepted at least this often (else not worth a pass)
FIT_WINDOW = 48                          # observations a pass cost is fitted to: costs drift (threads, batch mix)
TRIM_SCALE = 4.0                         # residuals beyond this many median absolute residuals are outliers
TRIM_FLOOR = 0.02                        # ... and beyond 2% of the median time (exact data trims nothing)
TRIM_ROUNDS = 2                          # trim, refit, trim again
RIDGE = 1e-3                             # ties a per-token slope the data cannot tell apart to zero
MIN_FIT_OBS = 3                          # observations before a fit replaces the static prior
PLAN_MARGIN = 0.05                       # drafts beyond the floor must promise this much: the model errs by ~10%
FORCED_PROBE_ROUNDS = 64                 # rounds without any nudger pass before the plan drafts once to re-measure
LAST_PLAN = object()                     # observe_round's default prediction: the last plan's
NO_FIXED = -1                            # best_round_plan's "the plan decides this request's count"
DRAFT, FLOOR = True, False               # a round whose plan drafts beyond the floor, or one that does not
CALIBRATION_WINDOW = 24                  # rounds of each kind the measured gain is judged on
MIN_CALIBRATION = 6                      # rounds of a kind before its factor moves from 1
LOCAL_ROUNDS = 8                         # a round's time is judged against this many rounds before it
EXPLORE_MIN, EXPLORE_MAX = 16, 128       # rounds before the losing kind runs once to re-measure (doubling)


@dataclass
class DraftStats:
    """Per request: exponentially decayed counts of accepted and rejected drafts, in BASE-mode rounds
    (the base agreed with the draft) and in NUDGE-mode rounds (the nudger kept writing)."""

    accepted: float = ACCEPT_PRIOR
    rejected: float = REJECT_PRIOR
    rounds_without_draft: int = 0
    probe_gap: int = PROBE_GAP_MIN   # BASE rounds without drafts before a probe that costs a nudger pass
    nudge_accepted: float = ACCEPT_PRIOR
    nudge_rejected: float = REJECT_PRIOR
    population: "DraftStats | None" = None   # where a planned request's observations also go

    def start_from(self, population: "DraftStats") -> None:
        """Replaces the fixed prior with the population's rates (same weight); later observations
        also feed the population."""
        self.accepted, self.rejected = _prior(population.accept_rate)
        self.nudge_accepted, self.nudge_rejected = _prior(population.nudge_rate)
        self.population = population

    @property
    def accept_rate(self) -> float:
        return self.accepted / (self.accepted + self.rejected)

    @property
    def nudge_rate(self) -> float:
        return self.nudge_accepted / (self.nudge_accepted + self.nudge_rejected)

    def observe(self, accepted: int, rejected: int, decay: float = HISTORY_DECAY) -> None:
        self.accepted = self.accepted * decay + accepted
        self.rejected = self.rejected * decay + rejected
        self.probe_gap = PROBE_GAP_MIN if accepted else min(self.probe_gap + PROBE_GAP_MIN, PROBE_GAP_MAX)
        if self.population is not None:
            self.population.observe(accepted, rejected, POPULATION_DECAY)

    def observe_nudge(self, accepted: int, rejected: int, decay: float = HISTORY_DECAY) -> None:
        self.nudge_accepted = self.nudge_accepted * decay + accepted
        self.nudge_rejected = self.nudge_rejected * decay + rejected
        if self.population is not None:
            self.population.observe_nudge(accepted, rejected, POPULATION_DECAY)


def _prior(rate: float) -> tuple[float, float]:
    return PRIOR_WEIGHT * rate, PRIOR_WEIGHT * (1 - rate)


def expected_tokens(k: int, accept_rate: float) -> float:
    """Tokens a round yields with k drafts each accepted with probability a: 1 + a + ... + a^k."""
    a = min(max(accept_rate, 0.0), 1 - 1e-6)
    return (1 - a ** (k + 1)) / (1 - a)


def expected_speedup(k: int, accept_rate: float, cost_ratio: float) -> float:
    return expected_tokens(k, accept_rate) / (1 + k * cost_ratio)


class PassCost:
    """seconds ~= per_pass * passes + per_token * tokens, fitted to the last FIT_WINDOW observations.

    Robust to a loaded machine: a pass descheduled for tens of ms, or a burst of slow passes, is one
    observation far above the line, and least squares would let it lift the line for dozens of rounds
    (which makes a round's fixed cost look dearer, and drafts, which save rounds, look cheaper than
    they are). So the fit is robust (csrc/pass_fit.cpp, run every round): a first line through each pass
    size's median time, weighted by its count and never above a larger size's (a size all of whose passes
    were slow, say the shape the plan then stopped choosing, takes the cost of the cheapest larger one),
    then least squares without the observations far from it (TRIM_SCALE median absolute residuals),
    twice. A slow burst longer than half the window is no longer an outlier: it is the machine's new speed.
    A small ridge on the per-token slope settles data that cannot separate the two (every round the
    same batch size) toward "a pass costs the same whatever it holds", the small-batch regime.
    """

    def __init__(self):
        self.obs: deque[tuple[float, float, float]] = deque(maxlen=FIT_WINDOW)   # (seconds, passes, tokens)
        self._coef: tuple[float, float] | None = None

    def observe(self, seconds: float, passes: float, tokens: float) -> None:
        if seconds <= 0 or passes <= 0:
            return
        self.obs.append((seconds, passes, tokens))
        self._coef = None

    @property
    def n(self) -> int:
        return len(self.obs)

    @property
    def ready(self) -> bool:
        return len(self.obs) >= MIN_FIT_OBS

    def coefficients(self) -> tuple[float, float]:
        """(seconds per pass, seconds per token), both >= 0."""
        if self._coef is None:
            self._coef = _core.robust_pass_fit(list(self.obs), RIDGE, TRIM_SCALE, TRIM_FLOOR, TRIM_ROUNDS, MIN_FIT_OBS)
        return self._coef

    def predict(self, passes: float, tokens: float) -> float:
        per_pass, per_token = self.coefficients()
        return per_pass * passes + per_token * tokens


class RobustMean:
    """A per-round cost (the round's own overhead) as the median of the last FIT_WINDOW values."""

    def __init__(self):
        self.values: deque[float] = deque(maxlen=FIT_WINDOW)
        self._value: float | None = 0.0

    def observe(self, value: float) -> None:
        self.values.append(value)
        self._value = None

    @property
    def value(self) -> float:
        if self._value is None:
            self._value = statistics.median(self.values)
        return self._value


class MeasuredGain:
    """How the plan's predicted seconds held up on rounds that drafted beyond the floor (DRAFT) and on
    rounds that did not (FLOOR): the guard against a cost model that is wrong in a way no fit shows
    (threads contending for cores, drafts timed short). Drafting must pay as measured.

    Each round's ratio of realized to predicted seconds is taken relative to the median ratio of the
    LOCAL_ROUNDS rounds just before it (of either kind): a machine that slows down for a while slows
    both kinds alike, so a round is judged against its neighbours. Per kind, the median over its last
    CALIBRATION_WINDOW rounds (a descheduled round is one value among them). Tokens are left to the
    acceptance histories: the plan drafts where they look best, so realized over predicted tokens of
    its drafting rounds is biased low (the winner's curse) and would hold drafts back where they pay."""

    def __init__(self):
        self.recent: deque[float] = deque(maxlen=LOCAL_ROUNDS)   # time ratios of the last rounds, any kind
        self.rounds = {DRAFT: deque(maxlen=CALIBRATION_WINDOW), FLOOR: deque(maxlen=CALIBRATION_WINDOW)}

    def observe(self, kind: bool, predicted_s: float, seconds: float) -> None:
        if predicted_s <= 0 or seconds <= 0:
            return
        ratio = seconds / predicted_s
        local = statistics.median(self.recent) if self.recent else ratio
        self.recent.append(ratio)
        self.rounds[kind].append(ratio / local)

    def ready(self, kind: bool) -> bool:
        return len(self.rounds[kind]) >= MIN_CALIBRATION

    def factor(self, kind: bool) -> float:
        """Predicted over realized seconds (1 until MIN_CALIBRATION rounds of the kind were seen)."""
        rounds = self.rounds[kind]
        return 1.0 / statistics.median(rounds) if len(rounds) >= MIN_CALIBRATION else 1.0


@dataclass
class PlanEntry:
    """One request as the round planner sees it."""

    stats: DraftStats
    cap: int                  # most drafts this round (draft_tokens, tokens left, token budget)
    nudging: bool = False     # in NUDGE mode: needs >= 1 nudger pass whatever the plan
    fixed: int | None = None  # k decided outside the plan (sampled or non-adaptive requests)
    pending: int = 1          # nudger tokens its first pass computes (lazy catch-up + the newest token)


class DraftPolicy:
    def __init__(self, cost_ratio: float, padded_queries: bool = False, recorder: Callable[[dict], None] | None = None):
        self.padded_queries = padded_queries  # the attention backend pads every query to the longest (torch)
        self.static_cost_ratio = cost_ratio  # from the models' sizes
        self._ratios: deque[float] = deque(maxlen=FIT_WINDOW)   # measured nudger pass / base pass
        self.draft_cost = PassCost()         # the round's nudger passes together
        # The base pass (+ the walk that waits for it), by its shape: UNIFORM when every request verifies
        # as many tokens (decode-shaped: a graph replay where graphs are on), MIXED otherwise (eager).
        self.verify_cost = {UNIFORM: PassCost(), MIXED: PassCost()}
        self.overhead = RobustMean()         # per round, outside the passes (bookkeeping, scheduling)
        self.rounds_since_pass = 0
        self.gain = MeasuredGain()
        self.verdict = True                  # whether drafting beyond the floor pays, as last measured
        self.explore_every = EXPLORE_MIN     # rounds between two that run the other kind (backs off)
        self.since_explore = 0
        self._prediction: tuple[bool, float] | None = None   # this round's plan: (kind, predicted seconds)
        self.recorder = recorder             # gets every observation and plan (engine/draft_record.py)

    @property
    def overhead_s(self) -> float:
        return self.overhead.value

    @property
    def cost_ratio(self) -> float:
        """One nudger pass over one base pass: measured (median of the window), else the static ratio."""
        return statistics.median(self._ratios) if self._ratios else self.static_cost_ratio

    # ------------------------------------------------------------------ one request alone
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
            self._ratios.append(nudger_pass_s / base_pass_s)

    # ------------------------------------------------------------------ the whole round
    def observe_round(self, draft_s: float, draft_passes: int, draft_tokens: int,
                      verify_s: float, verify_tokens: int, overhead_s: float | None = None,
                      uniform: bool = UNIFORM, emitted: int | None = None, prediction=LAST_PLAN) -> None:
        """The round's own timings: its nudger passes together, its base pass (its size and shape as
        `verify_size` gives them), and what else it spent; emitted: the tokens the round wrote, when
        every request in it was decoding (then the round checks the plan's prediction). prediction: the
        round's plan as take_prediction() gave it (default: the last plan's, for a caller that observes
        each round before it plans the next)."""
        if prediction is LAST_PLAN:
            prediction = self.take_prediction()
        if self.recorder is not None:
            self.recorder({"observe": [draft_s, draft_passes, draft_tokens, verify_s, verify_tokens, overhead_s,
                                       uniform, emitted, prediction]})
        if verify_s > 0:
            self.verify_cost[uniform].observe(verify_s, 1, verify_tokens)
        if draft_passes > 0:
            self.rounds_since_pass = 0
            self.draft_cost.observe(draft_s, draft_passes, draft_tokens)
            self.observe_pass_times(draft_s / draft_passes, verify_s)
        else:
            self.rounds_since_pass += 1
        if overhead_s is not None and overhead_s >= 0:
            self.overhead.observe(overhead_s)
        if prediction is not None and emitted is not None:
            kind, seconds = prediction
            self.gain.observe(kind, seconds, draft_s + verify_s + (overhead_s or 0.0))

    def take_prediction(self) -> tuple[bool, float] | None:
        """The last plan's (kind, predicted seconds), once: the round it planned observes against it."""
        prediction, self._prediction = self._prediction, None
        return prediction

    def refresh(self) -> None:
        """Refits what the next plan reads (run off the round's critical path: pairing/token.py)."""
        for fit in (self.draft_cost, *self.verify_cost.values()):
            if fit.ready:
                fit.coefficients()
        if self.overhead.values:
            self.overhead.value  # noqa: B018 - computes and caches the median

    def verify_size(self, queries: list[int]) -> tuple[int, bool]:
        """A verify pass's tokens as its cost counts them (padded where the backend pads), and whether
        it is UNIFORM. queries: each request's tokens in it."""
        longest = max(queries, default=0)
        tokens = len(queries) * longest if self.padded_queries else sum(queries)
        return tokens, min(queries, default=0) == longest

    def _costs(self, uniform: bool = UNIFORM) -> tuple[float, float, float, float]:
        """(verify s/pass, verify s/token, draft s/pass, draft s/token) for a verify pass of that shape;
        before its fit is ready, the other shape's; before any, the static ratio relative to the verify
        pass (whose unit cancels in the plan's comparison)."""
        own, other = self.verify_cost[uniform], self.verify_cost[not uniform]
        fit = own if own.ready else other if other.ready else None
        vp, vt = fit.coefficients() if fit is not None else (1.0, 0.0)
        if self.draft_cost.ready:
            dp, dt = self.draft_cost.coefficients()
        else:
            dp, dt = self.static_cost_ratio * vp, self.static_cost_ratio * vt
        return vp, vt, dp, dt

    def round_rate(self, entries: list[PlanEntry], ks: list[int]) -> float:
        """Expected emitted tokens per second of a round whose requests draft ks."""
        tokens = sum(_tokens(e, k) for e, k in zip(entries, ks))
        drafted = sum(e.pending + k - 1 for e, k in zip(entries, ks) if k > 0)
        return self._rate(ks, tokens, drafted)

    def _seconds(self, ks: list[int], drafted: int, costs=None) -> float:
        passes = max(ks, default=0)
        vp, vt, dp, dt = costs or self._costs(min(ks, default=0) == passes)
        verify_tokens = len(ks) * (1 + passes) if self.padded_queries else len(ks) + sum(ks)
        return self.overhead_s + vp + vt * verify_tokens + (dp * passes + dt * drafted if passes else 0.0)

    def _rate(self, ks: list[int], tokens: float, drafted: int, costs=None) -> float:
        """tokens: expected emitted; drafted: nudger tokens of the round's passes."""
        return tokens / max(self._seconds(ks, drafted, costs), 1e-12)

    def plan_round(self, entries: list[PlanEntry]) -> list[int]:
        """Draft counts for the requests of one round (entries with `fixed` keep theirs).

        For each pass count K, two candidates: each planned request drafts the k <= min(K, cap) whose
        expected tokens best pay for the tokens it adds at the floor's rate (its j-th draft adds a^j),
        or every planned request drafts min(K, cap) (a uniform verify pass, which graphs replay and the
        torch backend does not pad). The model keeps the candidate whose round rate is best; then the
        measured gain decides (`MeasuredGain`): drafts beyond the floor stay only if the rounds that
        drafted so far realized their predicted advantage, with an exploring round now and then.
        The search runs in the C++ core (csrc/round_plan.cpp, number for number the Python it replaced,
        tests/test_draft_policy.py's slow reference): it runs every round, on the host, while the device waits."""
        if not entries:
            return []
        best_ks, _, best_rate, floor, _, floor_rate = _core.best_round_plan(
            [e.stats.nudge_rate if e.nudging else e.stats.accept_rate for e in entries],
            [e.nudging for e in entries], [e.cap for e in entries],
            [NO_FIXED if e.fixed is None else e.fixed for e in entries], [e.pending for e in entries],
            self.overhead_s, self._costs(UNIFORM), self._costs(MIXED), self.padded_queries, PLAN_MARGIN)
        if best_ks != floor and not self._measured_gain(best_rate, floor_rate):
            best_ks = floor
        if max(best_ks) == 0 and self.rounds_since_pass >= FORCED_PROBE_ROUNDS:
            best_ks = [min(1, e.cap) if e.fixed is None else k for e, k in zip(entries, best_ks)]
        ks = _probes(entries, best_ks)
        drafted = sum(e.pending + k - 1 for e, k in zip(entries, ks) if k > 0)
        self._prediction = (DRAFT if ks != floor else FLOOR, self._seconds(ks, drafted))
        if self.recorder is not None:
            self.recorder({"plan": [_entry_record(e) for e in entries], "ks": ks})
        return ks

    def _measured_gain(self, rate: float, floor_rate: float) -> bool:
        """Whether the model's drafts run this round. With both kinds of round measured, drafting must
        beat the floor by PLAN_MARGIN after their factors (MeasuredGain); without, the model is trusted.
        The kind that loses still runs now and then, so its measure follows a machine whose speed
        changes: every `explore_every` rounds, a gap that doubles (up to EXPLORE_MAX) while the verdict
        stays the same, which bounds what exploring costs, and restarts when the verdict turns."""
        g = self.gain
        pays = (not (g.ready(DRAFT) and g.ready(FLOOR))
                or rate * g.factor(DRAFT) > floor_rate * g.factor(FLOOR) * (1 + PLAN_MARGIN))
        if pays != self.verdict:
            self.verdict, self.explore_every, self.since_explore = pays, EXPLORE_MIN, 0
        self.since_explore += 1
        if self.since_explore < self.explore_every:
            return pays
        self.since_explore = 0
        self.explore_every = min(2 * self.explore_every, EXPLORE_MAX)
        return not pays


def _probes(entries: list[PlanEntry], ks: list[int]) -> list[int]:
    """ks with the probes of requests whose BASE-mode history is stale: one draft each. A request
    that has not drafted for its probe gap (PROBE_GAP_MIN, growing by as much while its drafts are rejected)
    probes even if that costs a nudger pass (and the nudger's catch-up), unless its drafts were hardly
    ever accepted (PROBE_MIN_RATE: an unrelated nudger); then, in a round with passes, every request that has not
    drafted for PROBE_EVERY rounds drafts one in them (nearly free). Without probes a request whose
    first drafts were unlucky would never draft again, whatever its drafts would earn."""
    ks = [min(e.cap, 1) if k == 0 and e.fixed is None and not e.nudging and e.stats.rounds_without_draft >= e.stats.probe_gap
          and e.stats.accept_rate >= PROBE_MIN_RATE else k for e, k in zip(entries, ks)]
    passes = max(ks)
    return [k if e.fixed is not None or k > 0 or e.stats.rounds_without_draft < PROBE_EVERY
            else min(passes, e.cap, 1) for e, k in zip(entries, ks)]


def _entry_record(e: PlanEntry) -> list:
    s = e.stats
    return [s.accepted, s.rejected, s.nudge_accepted, s.nudge_rejected, s.rounds_without_draft, s.probe_gap, e.cap,
            e.nudging, e.fixed, e.pending]


def _tokens(e: PlanEntry, k: int) -> float:
    """Expected tokens a request emits with k drafts: in BASE mode 1 + a + ... + a^k; while nudging the
    first draft is the nudger's token and each further one holds while nudging goes on."""
    if e.nudging:
        return expected_tokens(max(k - 1, 0), e.stats.nudge_rate)
    return expected_tokens(k, e.stats.accept_rate)
