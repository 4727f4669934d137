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

from dataclasses import dataclass

ACCEPT_PRIOR, REJECT_PRIOR = 1.0, 1.0   # start at a = 0.5: one cheap draft until the request shows more
HISTORY_DECAY = 0.8                      # per round: acceptance is a property of the recent text
PRIOR_WEIGHT = ACCEPT_PRIOR + REJECT_PRIOR
POPULATION_DECAY = 0.98                  # per observation, over all planned requests together
UNIFORM, MIXED = True, False             # a verify pass's shape: every query as long, or not
PROBE_EVERY = 8                          # BASE rounds without drafts before drafting once more
COST_DECAY = 0.9
FIT_DECAY = 0.97                         # per observation of a pass cost: costs drift (threads, batch mix)
RIDGE = 1e-3                             # ties a per-token slope the data cannot tell apart to zero
MIN_FIT_OBS = 3                          # observations before a fit replaces the static prior
PLAN_MARGIN = 0.05                       # drafts beyond the floor must promise this much: the model errs by ~10%
FORCED_PROBE_ROUNDS = 64                 # rounds without any nudger pass before the plan drafts once to re-measure


@dataclass
class DraftStats:
    """Per request: exponentially decayed counts of accepted and rejected drafts, in BASE-mode rounds
    (the base agreed with the draft) and in NUDGE-mode rounds (the nudger kept writing)."""

    accepted: float = ACCEPT_PRIOR
    rejected: float = REJECT_PRIOR
    rounds_without_draft: int = 0
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
    """seconds ~= per_pass * passes + per_token * tokens, fitted by decayed least squares.

    A small ridge on the per-token slope settles data that cannot separate the two (every round the
    same batch size) toward "a pass costs the same whatever it holds", the small-batch regime.
    """

    def __init__(self):
        self.spp = self.spt = self.stt = self.sy_p = self.sy_t = 0.0  # decayed sums of x x^T and x y
        self.n = 0

    def observe(self, seconds: float, passes: float, tokens: float) -> None:
        if seconds <= 0 or passes <= 0:
            return
        d = FIT_DECAY
        self.spp = d * self.spp + passes * passes
        self.spt = d * self.spt + passes * tokens
        self.stt = d * self.stt + tokens * tokens
        self.sy_p = d * self.sy_p + seconds * passes
        self.sy_t = d * self.sy_t + seconds * tokens
        self.n += 1

    @property
    def ready(self) -> bool:
        return self.n >= MIN_FIT_OBS

    def coefficients(self) -> tuple[float, float]:
        """(seconds per pass, seconds per token), both >= 0."""
        stt = self.stt * (1 + RIDGE) + 1e-12
        det = self.spp * stt - self.spt * self.spt
        if det <= 1e-12 * self.spp * stt:   # collinear: all on the per-pass cost
            return self.sy_p / max(self.spp, 1e-12), 0.0
        per_pass = (stt * self.sy_p - self.spt * self.sy_t) / det
        per_token = (self.spp * self.sy_t - self.spt * self.sy_p) / det
        if per_token < 0:
            return self.sy_p / self.spp, 0.0
        if per_pass < 0:
            return 0.0, self.sy_t / stt
        return per_pass, per_token

    def predict(self, passes: float, tokens: float) -> float:
        per_pass, per_token = self.coefficients()
        return per_pass * passes + per_token * tokens


@dataclass
class PlanEntry:
    """One request as the round planner sees it."""

    stats: DraftStats
    cap: int                  # most drafts this round (draft_tokens, tokens left, token budget)
    nudging: bool = False     # in NUDGE mode: needs >= 1 nudger pass whatever the plan
    fixed: int | None = None  # k decided outside the plan (sampled or non-adaptive requests)
    pending: int = 1          # nudger tokens its first pass computes (lazy catch-up + the newest token)


class DraftPolicy:
    def __init__(self, cost_ratio: float, padded_queries: bool = False):
        self.padded_queries = padded_queries  # the attention backend pads every query to the longest (torch)
        self.static_cost_ratio = cost_ratio  # from the models' sizes
        self.cost_ratio = cost_ratio         # one nudger pass over one base pass, measured as the engine runs
        self.draft_cost = PassCost()         # the round's nudger passes together
        # The base pass (+ the walk that waits for it), by its shape: UNIFORM when every request verifies
        # as many tokens (decode-shaped: a graph replay where graphs are on), MIXED otherwise (eager).
        self.verify_cost = {UNIFORM: PassCost(), MIXED: PassCost()}
        self.overhead_s = 0.0                # per round, outside the passes (bookkeeping, scheduling)
        self.rounds_since_pass = 0

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
            measured = nudger_pass_s / base_pass_s
            self.cost_ratio = COST_DECAY * self.cost_ratio + (1 - COST_DECAY) * measured

    # ------------------------------------------------------------------ the whole round
    def observe_round(self, draft_s: float, draft_passes: int, draft_tokens: int,
                      verify_s: float, verify_tokens: int, overhead_s: float | None = None,
                      uniform: bool = UNIFORM) -> None:
        """The round's own timings: its nudger passes together, its base pass (its size and shape as
        `verify_size` gives them), and what else it spent."""
        if verify_s > 0:
            self.verify_cost[uniform].observe(verify_s, 1, verify_tokens)
        if draft_passes > 0:
            self.rounds_since_pass = 0
            self.draft_cost.observe(draft_s, draft_passes, draft_tokens)
            self.observe_pass_times(draft_s / draft_passes, verify_s)
        else:
            self.rounds_since_pass += 1
        if overhead_s is not None and overhead_s >= 0:
            self.overhead_s = COST_DECAY * self.overhead_s + (1 - COST_DECAY) * overhead_s

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

    def _rate(self, ks: list[int], tokens: float, drafted: int, costs=None) -> float:
        """tokens: expected emitted; drafted: nudger tokens of the round's passes."""
        passes = max(ks, default=0)
        vp, vt, dp, dt = costs or self._costs(min(ks, default=0) == passes)
        verify_tokens = len(ks) * (1 + passes) if self.padded_queries else len(ks) + sum(ks)
        seconds = self.overhead_s + vp + vt * verify_tokens + (dp * passes + dt * drafted if passes else 0.0)
        return tokens / max(seconds, 1e-12)

    def plan_round(self, entries: list[PlanEntry]) -> list[int]:
        """Draft counts for the requests of one round (entries with `fixed` keep theirs).

        For each pass count K, two candidates: each planned request drafts the k <= min(K, cap) whose
        expected tokens best pay for the tokens it adds at the floor's rate (its j-th draft adds a^j;
        see `_best_upto`), or every planned request drafts min(K, cap) (a uniform verify pass, which
        graphs replay and the torch backend does not pad). The plan keeps the candidate whose round
        rate is best. O(requests x cap) per round: it runs every round, on the host, while the device
        waits."""
        if not entries:
            return []
        floor = [e.fixed if e.fixed is not None else (min(1, e.cap) if e.nudging else 0) for e in entries]
        top = max([e.cap for e in entries if e.fixed is None] + floor)
        costs = {shape: self._costs(shape) for shape in (UNIFORM, MIXED)}
        floor_rate = self.round_rate(entries, floor)
        _, vt, _, dt = costs[MIXED]
        per_token = floor_rate * (vt + dt)  # tokens forgone per extra draft token in the two passes
        plans = [None if e.fixed is not None else _best_upto(e, f, per_token) for e, f in zip(entries, floor)]
        best_ks, best_rate = floor, floor_rate * (1 + PLAN_MARGIN)  # drafts that barely pay are a coin toss
        for K in range(1, top + 1):
            for uniform in (False, True):
                ks, tokens, drafted = [], 0.0, 0
                for e, f, plan in zip(entries, floor, plans):
                    if plan is None:
                        k, t = f, _tokens(e, f)
                    else:
                        upto, table = plan
                        k = min(K, e.cap) if uniform else upto[min(K, e.cap) - f]
                        t = table[k - f]
                    ks.append(k)
                    tokens += t
                    if k > 0:
                        drafted += e.pending + k - 1
                rate = self._rate(ks, tokens, drafted, costs[min(ks) == max(ks)])
                if rate > best_rate * (1 + 1e-9):
                    best_ks, best_rate = ks, rate
        if max(best_ks) == 0 and self.rounds_since_pass >= FORCED_PROBE_ROUNDS:
            best_ks = [min(1, e.cap) if e.fixed is None else k for e, k in zip(entries, best_ks)]
        # Passes that happen anyway: a request whose history is stale drafts in them (nearly free).
        passes = max(best_ks)
        return [k if e.fixed is not None or k > 0 or e.stats.rounds_without_draft < PROBE_EVERY
                else min(passes, e.cap, 1) for e, k in zip(entries, best_ks)]


def _best_upto(e: PlanEntry, floor: int, per_token: float) -> tuple[list[int], list[float]]:
    """([b - floor] -> the request's best draft count <= b, [k - floor] -> its expected tokens with k
    drafts), for b and k in floor..cap. Its k-th draft pays
    while its expected tokens exceed what the extra tokens cost at the current rate (drafting at all
    also computes its pending catch-up tokens; the passes themselves are paid once, by the plan)."""
    penalty = per_token * (e.pending - 1) if floor == 0 else 0.0
    table = [_tokens(e, k) for k in range(floor, e.cap + 1)]
    best_k, best_gain = floor, table[0] - per_token * floor
    upto = [floor]
    for k in range(floor + 1, e.cap + 1):
        gain = table[k - floor] - per_token * k - penalty
        if gain > best_gain:
            best_k, best_gain = k, gain
        upto.append(best_k)
    return upto, table


def _tokens(e: PlanEntry, k: int) -> float:
    """Expected tokens a request emits with k drafts: in BASE mode 1 + a + ... + a^k; while nudging the
    first draft is the nudger's token and each further one holds while nudging goes on."""
    if e.nudging:
        return expected_tokens(max(k - 1, 0), e.stats.nudge_rate)
    return expected_tokens(k, e.stats.accept_rate)
