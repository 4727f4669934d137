"""TokenPairing: the token path, for the base alone or a nudger with the same tokenizer (NUDGING.md 2, 5).

One round for the scheduled requests:
  1. the nudger drafts (first pass: catch-up/prefill of its pending tokens, then one token per pass),
  2. the base model verifies every request's pending and draft tokens in ONE forward,
  3. the handoff walk decides accepted drafts, the emitted token, the new mode (all requests at once),
  4. rejected drafts roll back in both KV caches.
Without a nudger the same loop is plain continuous-batching decoding of the base model.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch

from .. import _core
from ..engine.draft_policy import DraftPolicy
from ..engine.draft_record import attach_from_env
from .device_drafts import PLACEHOLDER, check_core, concat_ranges, draft_on_device
from .draft_plan import DraftPlanner
from .round_clock import RoundClock
from .handoff import Handoff
from .host_read import host_read
from ..engine.prompts import tokenize_prompt
from ..engine.request import Mode, Request, Source
from ..engine.sampler import request_generator
from ..model.tokenizer import IncrementalDetokenizer
from . import BASE_MODEL, NUDGER_MODEL, Pairing

log = logging.getLogger("nudge_engine")

MIN_COST_RATIO = 0.05  # a nudger pass is never free: launch and host costs
MIN_BATCHED_TOKENS_NUDGING = 2
FAILED = object()     # what a guarded per-request call returns when the request failed this step
NO_EMIT = -1          # settle_round's "no emitted token" (csrc/round_ops.cpp)
MODES = (Mode.BASE, Mode.NUDGE)   # a walk's mode value -> Mode
SRC_BASE, SRC_NUDGER = Source.BASE, Source.NUDGER


class TokenPairing(Pairing):
    def __init__(self, engine):
        super().__init__(engine)
        e = engine
        self.name = "same-tokenizer" if e.nudger is not None else "base-alone"
        if e.nudger is not None and e.max_num_batched_tokens < MIN_BATCHED_TOKENS_NUDGING:
            raise ValueError(f"max_num_batched_tokens must be >= {MIN_BATCHED_TOKENS_NUDGING} with a nudger "
                             f"(a round verifies at least one draft and the token before it), got {e.max_num_batched_tokens}")
        self.models, self.scheduler = e.models, e.scheduler
        self.base, self.nudger = e.base, e.nudger
        vocab = max(m.config.vocab_size for m in e.models)
        table = e.models[-1].tokenizer.word_start_table()[:vocab]
        self.word_start = torch.zeros(vocab, dtype=torch.bool)        # [vocab]
        self.word_start[: len(table)] = torch.tensor(table, dtype=torch.bool)
        ratio = e.models[-1].num_parameters / e.base.num_parameters
        self.draft_policy = attach_from_env(DraftPolicy(cost_ratio=max(ratio, MIN_COST_RATIO),
                                                        padded_queries=e.base.runner.backend.name == "torch"))
        self._emitted = 0       # tokens the last round wrote (the plan checks its prediction against it)
        self._observation = None   # the last round's timings, observed during the next (_observe_previous)
        self.draft_planner = DraftPlanner(self.draft_policy, e)
        self._round_end = None  # perf_counter at the end of the previous round (the gap is overhead)
        self.clock = RoundClock(e.device)
        self.handoff = Handoff(e.device, self.word_start, e.base.runner.backend.name == "triton")
        log.info("same-tokenizer token path: base %s%s, %d KV blocks of %d tokens per model, "
                 "backend %s",
                 e.paths[0], f", nudger {e.paths[1]}" if e.nudger else "", e.base.pool.num_blocks, e.block_size,
                 e.models[0].runner.backend.name)

    def new_request(self, prompt, params, nudge):
        e, nudger = self.engine, self.nudger
        base_ids, nudger_ids = tokenize_prompt(prompt, self.base.tokenizer,
                                               nudger.tokenizer if nudger else None, e.chat_format)
        if not base_ids or (nudger is not None and not nudger_ids):
            raise ValueError("prompt is empty after tokenization")
        for m, ids, role in zip(self.models, (base_ids, nudger_ids), ("base", "nudger")):
            m.check_fits(role, len(ids), params.max_tokens)
        d = e.defaults
        rid = e.new_id()
        _, gen = request_generator(params.seed, e._seed_gen)
        req = Request(
            id=rid, base_prompt=base_ids, nudger_prompt=nudger_ids, params=params,
            nudger_params=nudge.nudger_sampling(params),
            gamma=(d.gamma if nudge.gamma is None else nudge.gamma) if nudger else 0.0,
            draft_tokens=d.draft_tokens if nudge.draft_tokens is None else nudge.draft_tokens,
            adaptive_drafting=d.adaptive_drafting if nudge.adaptive_drafting is None else nudge.adaptive_drafting,
            resume_on_agreement=d.resume_on_agreement if nudge.resume_on_agreement is None else nudge.resume_on_agreement,
            eos_ids=e.eos_ids, detok=IncrementalDetokenizer.after_prompt(self.base.tokenizer, base_ids),
            generator=gen,
        )
        if params.logprobs is not None:
            req.logprobs = []
        if params.prompt_logprobs is not None:
            req.prompt_logprobs = [None]
        req.base_seq = _core.Sequence(self.base.pool)
        req.base_seq.append(base_ids)
        # Prompt logprobs need a logits row at every prompt position: the base never takes cached
        # blocks for such a request (it still caches its own for others).
        req.base_seq.reuse_cached_prefix = params.prompt_logprobs is None
        seqs = [req.base_seq]
        if nudger is not None:
            req.nudger_seq = _core.Sequence(nudger.pool)
            seqs.append(req.nudger_seq)
        return req, seqs

    def run_round(self, reqs: list[Request], sched) -> list[Request]:
        e = self.engine
        final = sched.is_final_chunk
        drafts_k = [r.planned_drafts if f else 0 for r, f in zip(reqs, final)]
        prediction = self.draft_policy.take_prediction()   # what the plan expected of this round
        started = self.clock.mark()
        drafts, draft_logits, values = draft_on_device(
            self, reqs, sched.num_new_tokens[NUDGER_MODEL] if self.nudger else None, drafts_k, final)
        drafted = self.clock.mark()
        base_logits, walk_rows, prompt_rows = self._verify(reqs, sched.num_new_tokens[BASE_MODEL], drafts, final,
                                                           values)
        launched = self.clock.mark()    # on CUDA: the verify pass is queued, not yet run
        self._observe_previous()        # ... so the previous round's bookkeeping overlaps it (README: host time)
        if prompt_rows is not None:
            for entry in prompt_rows:
                if entry is not None:
                    e.guard(entry[0], self._record_prompt_logprobs, entry, base_logits)
        failed = e.failed
        finals = [i for i, f in enumerate(final) if f and reqs[i].id not in failed]
        decisions = self.handoff.decide([reqs[i] for i in finals], [drafts[i] for i in finals],
                                        [walk_rows[i] for i in finals], base_logits,
                                        [draft_logits[i] for i in finals], values, finals)
        verified = self.clock.mark()  # the walk's copy back has waited for the base pass
        touched = self._apply_all([reqs[i] for i in finals], [drafts[i] for i in finals], decisions)
        self._observation = self._measure_round(reqs, sched, drafts_k, drafts, started, drafted, launched, verified,
                                                prediction)
        self.draft_planner.next_round()
        return touched

    def _apply_all(self, reqs: list[Request], drafts: list[list[int]], decisions: list) -> list[Request]:
        """Each request's tokens, stops and history (Python, per request: a raise ends that request
        alone), then the sequences of every request that goes on, both models, in one C++ call each."""
        e = self.engine
        failed = e.failed
        touched = []
        base, nudger = SeqUpdates(), SeqUpdates()
        totals = [0, 0, 0, 0, 0]   # drafted, accepted, nudger tokens, base tokens, handoffs
        for req, d, decision in zip(reqs, drafts, decisions):
            if isinstance(decision, Exception):
                failed[req.id] = decision
                continue
            try:
                self._apply(req, d, decision, totals)
            except Exception as exc:  # noqa: BLE001 - it belongs to this request alone
                failed[req.id] = exc
                continue
            touched.append(req)
            if req.finished:
                continue
            emit = NO_EMIT if decision.emit_token is None else decision.emit_token
            base.add(req, req.base_seq, d, decision.num_accepted, emit)
            if d:   # the nudger holds this round's tokens only if it drafted (lazy catch-up)
                nudger.add(req, req.nudger_seq, d, decision.num_accepted, emit)
        e.stats.record_rounds(len(touched), *totals)
        self._emitted = totals[2] + totals[3]
        base.run(failed)
        nudger.run(failed)
        return [r for r in touched if r.id not in failed] if failed else touched

    def _measure_round(self, reqs, sched, drafts_k, drafts, started, drafted, launched, verified,
                       prediction) -> tuple:
        """The round's own timings and sizes for the draft policy's cost model (no extra syncs): the
        arguments of DraftPolicy.observe_round, given to it in the next round (_observe_previous)."""
        ended = time.perf_counter()
        passes = max(drafts_k, default=0)
        nudger_new = sched.num_new_tokens[NUDGER_MODEL] if self.nudger else [0] * len(reqs)
        draft_tokens = sum(n for n, k in zip(nudger_new, drafts_k) if k > 0) + sum(max(k - 1, 0) for k in drafts_k)
        verify_tokens, uniform = self.draft_policy.verify_size(
            [n + len(d) for n, d in zip(sched.num_new_tokens[BASE_MODEL], drafts)])
        gap = started.host_s - self._round_end if self._round_end is not None else None
        busy = ended - started.host_s
        overhead = (ended - verified.host_s) + (gap if gap is not None and gap < busy * 4 else 0.0)
        decoding = all(sched.is_final_chunk) and not self.engine.failed   # else the emitted count says little
        self._round_end = ended
        return (started, drafted, launched, verified, passes, draft_tokens, verify_tokens, overhead, uniform,
                self._emitted if decoding else None, prediction)

    def _observe_previous(self) -> None:
        """The previous round's observation, and the cost fits refitted with it, while this round's passes
        run on the device (on CUDA; the CPU runs them in turn). The next round's plan reads the refitted
        fits; this round's plan was made without its predecessor's timings (one round late)."""
        if self._observation is None:
            return
        (started, drafted, launched, verified, passes, draft_tokens, verify_tokens, overhead, uniform, emitted,
         prediction) = self._observation
        self._observation = None
        self.draft_policy.observe_round(RoundClock.between(started, drafted), passes, draft_tokens,
                                        RoundClock.between(drafted, launched, host_end=verified),
                                        verify_tokens, overhead, uniform=uniform, emitted=emitted,
                                        prediction=prediction)
        self.draft_policy.refresh()

    def _draft_count(self, req: Request) -> int:
        """Draft tokens this round: while nudging, the nudger writes anyway (at least one token);
        in BASE mode up to draft_tokens, fewer where the policy sees drafts not paying.

        Never more than the tokens the request may still emit: admission checked that prompt +
        max_tokens fits both contexts and both pools, so no draft reaches past a model's last
        position or a pool's capacity (and never past the step's token budget).
        """
        if req.nudger_seq is None:
            return 0
        return self.draft_planner.count(req)

    def prepare(self, req: Request) -> None:
        """Plans the request's drafts for this round. Lazy catch-up: the nudger sees the output only
        in rounds where it drafts."""
        k = req.planned_drafts = self._draft_count(req)
        if req.nudger_seq is None:
            if req.lookahead != k:
                self.scheduler.set_lookahead(req.id, [k])
                req.lookahead = k
            return
        if k > 0:
            if req.nudger_seq.num_tokens == 0:
                req.nudger_seq.append(req.nudger_prompt)
            seen = req.nudger_seq.num_tokens - len(req.nudger_prompt)
            if seen < len(req.output):
                req.nudger_seq.append(req.output[seen:])
        if req.lookahead != k:
            self.scheduler.set_lookahead(req.id, [k, max(k - 1, 0)])
            req.lookahead = k

    def _verify(self, reqs: list[Request], num_new: list[int], drafts: list[list[int]], final: list[bool],
                values=None):
        """The base pass: pending + draft tokens of every request; logits rows for the walk.
        values (RoundDrafts): the drafts' values on the device, over the placeholders in `drafts`.
        -> (logits, each request's walk rows (a slice of the logits rows), prompt-logprob entries or None)"""
        counts = [len(d) if f else 0 for d, f in zip(drafts, final)]
        seqs = [r.base_seq for r in reqs]
        if any(counts):
            check_core(_core.append_placeholders(seqs, counts, PLACEHOLDER), "verify placeholders")
        nums = [n + c for n, c in zip(num_new, counts)]
        if any(r.prompt_logprobs is not None for r in reqs):
            rows, walk_rows, prompt_rows = self._rows_with_prompt_logprobs(reqs, nums, counts, final)
        else:
            rows, walk_rows = _walk_rows(nums, counts, final)
            prompt_rows = None
        override = None
        if values is not None and any(counts):
            draft_req = [i for i, c in enumerate(counts) if c]
            ends = np.cumsum(np.asarray(nums, dtype=np.int64))
            pos = concat_ranges([int(ends[i]) - counts[i] for i in draft_req], [counts[i] for i in draft_req])
            dev = self.base.runner.device
            override = (torch.from_numpy(pos).to(dev), values.flat(draft_req, [counts[i] for i in draft_req]).to(dev))
        logits = self.base.forward(seqs, nums, rows, override)
        check_core(_core.advance_computed(seqs, nums), "verify pass")
        return logits, walk_rows, prompt_rows

    @staticmethod
    def _rows_with_prompt_logprobs(reqs, nums, counts, final):
        """Logits rows when some request wants prompt logprobs: its prompt rows, then every request's walk rows."""
        rows, walk_rows, prompt_rows = [], [], []
        start = 0
        for req, total, c, f in zip(reqs, nums, counts, final):
            computed = req.base_seq.num_computed
            first = len(rows)
            # Recomputed after a preemption: the positions already recorded are not recorded again.
            done = len(req.prompt_logprobs) - 1 if req.prompt_logprobs is not None else 0
            if req.prompt_logprobs is not None and max(computed, done) < len(req.base_prompt) - 1:
                # The row at position p predicts prompt token p + 1: positions up to the prompt's last but one
                # (a chunk's last position too: its next token is known).
                upto = min(computed + total, len(req.base_prompt) - 1)
                frm = max(computed, done)
                rows.extend(range(start + frm - computed, start + max(upto, frm) - computed))
                prompt_rows.append((req, frm, len(rows) - first, first))
            else:
                prompt_rows.append(None)
            walk_first = len(rows)
            if f:
                rows.extend(range(start + total - c - 1, start + total))
            walk_rows.append(slice(walk_first, len(rows)))
            start += total
        return rows, walk_rows, prompt_rows

    @staticmethod
    def _record_prompt_logprobs(entry, logits) -> None:
        req, computed, count, first = entry
        if count <= 0:
            return
        lp = host_read(torch.log_softmax(logits[first:first + count], dim=-1))
        targets = req.base_prompt[computed + 1: computed + 1 + count]
        req.prompt_logprobs.extend(_top_logprobs(lp, targets, req.params.prompt_logprobs))

    def _apply(self, req: Request, drafts: list[int], decision, totals: list[int]) -> None:
        """The request's side of a decision: its tokens, stops, mode and histories (its sequences are
        settled for all requests at once in _apply_all). totals: the round's counters, added to."""
        m, emit = decision.num_accepted, decision.emit_token
        if emit is None:
            tokens, sources = drafts[:m], decision.accepted_sources[:m]
        else:
            tokens, sources = drafts[:m] + [emit], decision.accepted_sources[:m] + [SRC_BASE]
        was_mode = req.mode
        req.mode, req.run = MODES[decision.mode], decision.run
        req.rounds += 1
        req.drafted += len(drafts)
        req.accepted += m
        nudged = sources.count(SRC_NUDGER)
        totals[0] += len(drafts)
        totals[1] += m
        totals[2] += nudged
        totals[3] += len(sources) - nudged
        if was_mode is not req.mode:
            totals[4] += 1
        if req.nudger_seq is not None and req.adaptive_drafting:   # only an adaptive request's k reads its history
            if was_mode is Mode.BASE:
                self._observe_drafts(req, len(drafts), decision)
            else:
                self._observe_nudging(req, len(drafts), decision)
        req.add_tokens(tokens, sources, decision.logprobs)
        if req.finished:
            self.scheduler.finish(req.id)
            del self.engine.requests[req.id]

    @staticmethod
    def _observe_drafts(req: Request, drafted: int, decision) -> None:
        """Acceptance history of a round that began in BASE mode: the drafts that became tokens (the
        base agreed, or the nudger's draft was the nudged token), and one rejection when the round kept
        fewer than it drafted: what the round plan needs to predict tokens per round."""
        stats = req.draft_stats
        if drafted == 0:
            stats.rounds_without_draft += 1
            return
        stats.rounds_without_draft = 0
        agreed, corrected = decision.num_accepted, decision.num_accepted < drafted
        stats.observe(agreed, int(corrected))

    @staticmethod
    def _observe_nudging(req: Request, drafted: int, decision) -> None:
        """History of a round that began in NUDGE mode: nudger tokens kept after the first (which the
        nudger writes anyway), and one stop when the round kept fewer than it drafted."""
        if drafted:
            req.draft_stats.observe_nudge(max(decision.num_accepted - 1, 0), int(decision.num_accepted < drafted))



class SeqUpdates:
    """One model's sequence updates of a round, gathered request by request, applied in one C++ call
    (csrc/round_ops.cpp settle_round): drafts' values over placeholders, rejected ones cut, the
    emitted token appended, the newest token left pending (the invariant between rounds)."""

    def __init__(self):
        self.reqs, self.seqs, self.values, self.counts, self.accepted, self.emit = [], [], [], [], [], []

    def add(self, req: Request, seq, drafts: list[int], accepted: int, emit: int) -> None:
        self.reqs.append(req)
        self.seqs.append(seq)
        self.values.extend(drafts)
        self.counts.append(len(drafts))
        self.accepted.append(accepted)
        self.emit.append(emit)

    def run(self, failed: dict) -> None:
        """A sequence whose update raised fails its request alone."""
        if self.seqs:
            for i, message in _core.settle_round(self.seqs, self.values, self.counts, self.accepted, self.emit):
                failed[self.reqs[i].id] = RuntimeError(message)


def _walk_rows(nums: list[int], counts: list[int], final: list[bool]) -> tuple[np.ndarray, list[slice]]:
    """Logits rows of a pass without prompt logprobs: each final request's last counts[i] + 1 tokens
    (the token before its drafts, then its drafts), in order. -> (rows [R'] int64, per request its
    slice of them; an empty one for a prefill chunk)."""
    ends = np.cumsum(np.asarray(nums, dtype=np.int64))
    lens = [c + 1 if f else 0 for c, f in zip(counts, final)]
    firsts = [int(end) - n for end, n in zip(ends, lens)]
    rows = concat_ranges(firsts, lens)
    walk_rows, at = [], 0
    for n in lens:
        walk_rows.append(slice(at, at + n))
        at += n
    return rows, walk_rows


def _top_logprobs(lp: torch.Tensor, targets: list[int], n: int) -> list[dict[int, float]]:
    """lp [rows, vocab] log-probabilities -> per row {target: lp, top-n others: lp}, target first."""
    out = []
    top = lp.topk(n, dim=-1) if n > 0 else None
    for i, t in enumerate(targets):
        entry = {int(t): float(lp[i, t])}
        if top is not None:
            for v, idx in zip(top.values[i].tolist(), top.indices[i].tolist()):
                entry.setdefault(idx, v)
        out.append(entry)
    return out
