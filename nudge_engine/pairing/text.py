"""TextPairing: nudging between models with different tokenizers (NUDGING.md section 7).

The shared state is the output text (bytes, in spans, see spans.py). Each model keeps its own
paged KV cache of its own context, and reads the other's text only as finished words, converted
once: a handoff costs tokens proportional to the new text, never a prefill of the prefix.

One round for the scheduled requests:
  1. nudger passes (batched): catch-up on the base's new words, then draft tokens:
     NUDGE mode: the nudger writes up to k tokens (its own greedy or sampled tokens; they queue
     until decided), BASE mode (k > 0): speculative drafts (its argmax) from the base text so far,
     verified by exact match against the base's own token (argmax or sample);
  2. ONE base pass (batched): BASE mode: its pending token + the drafts' text in base tokens;
     NUDGE mode: the nudger's new finished words, with a logits row at every word start;
  3. a walk per request applies the section 7 rules in order and rolls back what was not used.
k = 0 drafts nothing in BASE mode (lazy catch-up) and one token per round while nudging. With
adaptive_drafting the BASE-mode k of each round is DraftPolicy's pick (up to draft_tokens).
Sampling (per-model settings, seeded per request) is exact for every k: text_sampling.py says why.
Every SamplingParams field works as on the token path; logprobs are per written token, in each
writer's vocabulary, and prompt_logprobs the base's (text_logprobs.py).

Where section 7 leaves a detail open, this file (and tests/reference_cross.py) fix it so:
  - a word start is a nudger token whose bytes begin with ASCII whitespace, or the nudger's EOS;
  - agreement: the base token's bytes (non-empty, no whitespace after the first byte) are a
    prefix of the nudger's next word, read over at most AGREE_LOOKAHEAD nudger tokens;
  - max_tokens: the base tokens of the text (the unfinished last word as it stands); when a
    nudger token overshoots, the output is cut to the first max_tokens base tokens;
  - the request also ends ("length") when the nudger's context nears its position limit;
  - stop_token_ids are base-vocabulary ids, checked on tokens the base writes;
  - with sampling and resume_on_agreement, the nudger's next word is the one it samples next: if
    the base does not take over, those sampled tokens are the nudger's next tokens (never redrawn).
"""
from __future__ import annotations

import logging

import torch

from .host_read import host_read
from .. import _core
from .text_request import CrossRequest, ReadWork
from .text_logprobs import JointVocab, prompt_rows, queue_entry, record_prompt, record_queued, record_written
from .text_sampling import base_token, nudger_tokens, start_nudge_run
from .text_stops import TextStops
from .spans import BASE, NUDGER
from .wordpieces import WHITESPACE, WordPieces, starts_word
from ..engine.draft_policy import DraftPolicy
from ..engine.prompts import tokenize_prompt
from ..engine.sampler import request_generator
from ..engine.request import Mode
from . import BASE_MODEL, NUDGER_MODEL, Pairing

log = logging.getLogger("nudge_engine")

assert (BASE, NUDGER) == (BASE_MODEL, NUDGER_MODEL)
# The agreement test compares the base's token with at most this many nudger tokens of its word.
AGREE_LOOKAHEAD = 8
UNDECIDED = None          # agreement needs more of the nudger's word than drafted so far
MAX_DRAFT_TOKENS = 64     # NudgeParams' bound on draft_tokens
# A request ends ("length") when the nudger's context gets this close to its position limit, so
# that drafts and the agreement lookahead always fit. It also ends nudger runs of text-less
# special tokens, which max_tokens (base tokens of the text) would never count.
NUDGER_HEADROOM = MAX_DRAFT_TOKENS + AGREE_LOOKAHEAD
MIN_COST_RATIO = 0.05     # a nudger pass is never free (as on the token path)


class TextPairing(TextStops, Pairing):
    """Tokenizers that differ: the text path, with the token path's request features."""

    name = "cross-tokenizer"

    def __init__(self, engine):
        super().__init__(engine)
        e = engine
        self.models, self.scheduler = e.models, e.scheduler
        self.base, self.nudger = e.base, e.nudger
        self.wp = [WordPieces(m.tokenizer) for m in self.models]      # [model]
        self.eos = [frozenset(m.config.eos_token_ids) for m in self.models]  # [model]: each model's own EOS
        self.nudger_context_limit = self.nudger.config.max_position_embeddings - NUDGER_HEADROOM
        ratio = self.nudger.num_parameters / self.base.num_parameters
        self.draft_policy = DraftPolicy(cost_ratio=max(ratio, MIN_COST_RATIO))
        self.logprob_vocab = JointVocab(self.wp, [m.tokenizer for m in self.models], self.base.config.vocab_size)
        log.info("cross-tokenizer text path: base %s, nudger %s, %d KV blocks of %d tokens "
                 "per model", e.paths[0], e.paths[1], self.base.pool.num_blocks, e.block_size)

    def new_request(self, prompt, params, nudge):
        e = self.engine
        if isinstance(prompt, list):
            raise ValueError("token ids mean different things to the two tokenizers: send text, or "
                             "{'base': ids, 'nudger': ids}")
        ids = tokenize_prompt(prompt, self.base.tokenizer, self.nudger.tokenizer, e.chat_format)
        if not ids[BASE] or not ids[NUDGER]:
            raise ValueError("prompt is empty after tokenization")
        if len(ids[NUDGER]) >= self.nudger_context_limit:
            raise ValueError(f"the nudger's prompt ({len(ids[NUDGER])} tokens) leaves no room to write "
                             f"(limit {self.nudger_context_limit} = context - {NUDGER_HEADROOM} for drafts)")
        for m, p, role in zip(self.models, ids, ("base", "nudger")):
            m.check_fits(role, len(p), params.max_tokens)
        d = e.defaults
        seed, base_gen = request_generator(params.seed, e._seed_gen)
        req = CrossRequest(
            id=e.new_id(), params=params,
            gamma=d.gamma if nudge.gamma is None else nudge.gamma,
            draft_tokens=d.draft_tokens if nudge.draft_tokens is None else nudge.draft_tokens,
            resume_on_agreement=d.resume_on_agreement if nudge.resume_on_agreement is None else nudge.resume_on_agreement,
            prompts=(list(ids[BASE]), list(ids[NUDGER])),
            seqs=(_core.Sequence(self.base.pool), _core.Sequence(self.nudger.pool)),
            nudger_params=nudge.nudger_sampling(params), seed=seed, base_gen=base_gen,
            nudger_gen=torch.Generator(),
            adaptive_drafting=d.adaptive_drafting if nudge.adaptive_drafting is None else nudge.adaptive_drafting,
        )
        req.seqs[BASE].append(req.prompts[BASE])
        if params.logprobs is not None:
            req.written = []
        if params.prompt_logprobs is not None:
            req.prompt_logprobs = [None]
        return req, list(req.seqs)

    def run_round(self, reqs: list[CrossRequest], sched) -> list[CrossRequest]:
        """A failure in one request's walk ends it alone (marked in engine.failed, ended by the engine)."""
        e = self.engine
        final = list(sched.is_final_chunk)
        chunks = [list(sched.num_new_tokens[m]) for m in (BASE, NUDGER)]
        drafts = self._nudger_passes(reqs, final, chunks[NUDGER])
        checks = self._base_pass(reqs, final, chunks[BASE], drafts)
        touched = []
        for req, f, d, c in zip(reqs, final, drafts, checks):
            if not f:
                continue
            req.rounds += 1
            e.stats.rounds += 1
            was = req.mode
            try:
                if req.mode == Mode.BASE:
                    self._walk_base(req, d, c)
                else:
                    self._walk_nudge(req, c)
                e.stats.handoffs += int(was != req.mode)
                if req.finished:
                    self._finish(req)
                else:
                    self._settle(req)
            except Exception as exc:  # noqa: BLE001 - it belongs to this request alone
                e.failed[req.id] = exc
                continue
            touched.append(req)
        return touched

    def prepare(self, req: CrossRequest) -> None:
        """Before scheduling: the BASE-mode draft count, then the nudger reads the base's new words;
        scratch for BASE-mode drafts."""
        req.planned_drafts = req.draft_tokens
        if req.mode == Mode.BASE and req.adaptive_drafting:
            # Exact for every k (greedy and sampled alike), so measured timings may choose it.
            req.planned_drafts = self.draft_policy.choose(req.draft_stats, req.draft_tokens, measured=True)
        dc = req.draft_count()
        n = req.seqs[NUDGER]
        extra = [0, 0]
        if req.mode == Mode.NUDGE or dc > 0:
            if not req.started:
                n.append(req.prompts[NUDGER])
                req.stable, req.started = len(req.prompts[NUDGER]), True
            n.truncate(req.stable + len(req.queue))     # BASE-mode scratch and drafts of the last round
            n.set_num_computed(min(n.num_computed, n.num_tokens - 1))
            # NUDGE: the base's span is closed, so its last word is final too.
            tokens, nbytes = req.text.read(NUDGER, self.wp[NUDGER], through_end=req.mode == Mode.NUDGE)
            assert not (tokens and req.queue)
            n.append(tokens)
            req.stable += len(tokens)
            scratch, scratch_tokens = b"", []
            if req.mode == Mode.BASE:   # the base's unfinished last word: context for drafting only
                scratch = bytes(req.text.data[req.text.covered[NUDGER]:])
                scratch_tokens = self.wp[NUDGER].encode(scratch)
                n.append(scratch_tokens)
            if nbytes or scratch:
                req.open_read[NUDGER] = ReadWork("nudger", nbytes + len(scratch), len(tokens) + len(scratch_tokens))
            extra[NUDGER] = dc + (AGREE_LOOKAHEAD if req.mode == Mode.NUDGE else 0)
            # Base tokens of the drafted text: a guess for the reservation; _base_pass re-checks.
            extra[BASE] = 2 * extra[NUDGER]
        cap = self.engine.max_num_batched_tokens - 1
        self.scheduler.set_lookahead(req.id, [min(e, cap) for e in extra])

    def _computed(self, req: CrossRequest, m: int, num: int) -> None:
        seq = req.seqs[m]
        seq.set_num_computed(seq.num_computed + num)
        req.computed[m] += num
        if req.open_read[m] is not None:
            req.open_read[m].computed_tokens = num
            req.work.append(req.open_read[m])
            req.open_read[m] = None

    # ------------------------------------------------------------------ nudger
    def _is_word_start(self, t: int) -> bool:
        """A nudger token where the base may take over: its text starts a word, or it ends the text."""
        return t in self.eos[NUDGER] or starts_word(self.wp[NUDGER].token_bytes[t])

    def _last_check(self, req: CrossRequest) -> int | None:
        """Index in the queue of the last word start the base must check (the run's first token never is)."""
        for i in range(len(req.queue) - 1, -1, -1):
            if req.run + i > 0 and self._is_word_start(req.queue[i]):
                return i
        return None

    def _word_known(self, req: CrossRequest, i: int) -> bool:
        """Whether the queue holds enough of the word at queue[i] for any agreement test."""
        tb, n, got = self.wp[NUDGER].token_bytes, 0, 0
        for j, u in enumerate(req.queue[i:]):
            if j > 0 and starts_word(tb[u]):
                return True
            got += len(tb[u])
            n += 1
            if u in self.eos[NUDGER] or n >= AGREE_LOOKAHEAD or got >= self.wp[BASE].max_word_token_bytes:
                return True
        return False

    def _wants_draft(self, req: CrossRequest, drafts: list[int]) -> bool:
        ended = lambda toks: bool(toks) and toks[-1] in self.eos[NUDGER] and not req.params.ignore_eos  # noqa: E731
        if req.mode == Mode.BASE:
            return len(drafts) < req.draft_count() and not ended(drafts)
        if ended(req.queue) or len(req.queue) >= req.draft_count() + AGREE_LOOKAHEAD:
            return False              # bounded: word starts must not chain the lookahead forever
        if len(req.queue) < req.draft_count():
            return True
        last = self._last_check(req) if req.resume_on_agreement else None
        return last is not None and not self._word_known(req, last)

    def _nudger_passes(self, reqs: list[CrossRequest], final: list[bool], chunk: list[int]) -> list[list[int]]:
        """Prefill chunks, then draft passes (one token per request per pass). -> BASE-mode drafts."""
        drafts: list[list[int]] = [[] for _ in reqs]
        active: dict[int, int] = {}
        for i, req in enumerate(reqs):
            n = req.seqs[NUDGER]
            if not final[i]:
                if chunk[i] > 0:
                    active[i] = chunk[i]
            elif req.started and self._wants_draft(req, drafts[i]):
                active[i] = n.num_tokens - n.num_computed
        while active:
            for i in [i for i, num in active.items() if not reqs[i].seqs[NUDGER].reserve(
                    reqs[i].seqs[NUDGER].num_computed + num)]:
                del active[i]                       # pool short: draft less this round
            if not active:
                break
            idx = list(active)
            logits = self.models[NUDGER].forward([reqs[i].seqs[NUDGER] for i in idx], [active[i] for i in idx])
            tokens = nudger_tokens([reqs[i] for i in idx], logits,
                                   [final[i] and reqs[i].mode == Mode.NUDGE for i in idx])
            nxt = {}
            for row, i, t in zip(logits, idx, tokens):
                req = reqs[i]
                self._computed(req, NUDGER, active[i])
                if not final[i]:
                    continue
                req.seqs[NUDGER].append(t)
                req.drafted += 1
                (drafts[i] if req.mode == Mode.BASE else req.queue).append(t)
                if req.mode == Mode.NUDGE:
                    queue_entry(req, self.logprob_vocab, t, row)
                if self._wants_draft(req, drafts[i]):
                    nxt[i] = 1
            active = nxt
        return drafts

    # ------------------------------------------------------------------ base
    def _base_pass(self, reqs, final, chunk, drafts) -> list:
        """ONE base forward. -> per request: BASE: (verify tokens, [(top1, argmax, logits)] per row);
        NUDGE: {queue index: (top1, argmax, logits, base tokens up to it, text offset)} plus the
        tokens. Rows for prompt_logprobs ride along after the walk's rows."""
        seqs, nums, rows, plans, scored = [], [], [], [], []     # scored: (request, prompt rows)
        start = 0
        for i, req in enumerate(reqs):
            b = req.seqs[BASE]
            plan = None
            if not final[i]:
                num = chunk[i]
            else:
                pending = b.num_tokens - b.num_computed
                if req.mode == Mode.BASE:
                    room = req.params.max_tokens - len(req.base_out) - 1     # verify no more than can be kept
                    new = self.wp[BASE].encode(self.wp[NUDGER].bytes_of(drafts[i]))[:max(room, 0)]
                    new = new[:self._room(b, len(new))]
                    offsets = [start + pending - 1 + j for j in range(len(new) + 1)]
                    plan = (new, offsets)
                else:
                    new, points = self._words_to_check(req)
                    # A word start past max_tokens is never reached: the text ends before it.
                    fit = min(self._room(b, len(new)), req.params.max_tokens - len(req.base_out))
                    points = [p for p in points if p[1] <= fit]
                    new = new[:points[-1][1]] if points else []
                    plan = (new, [(q, start + pending - 1 + ntok, ntok, off) for q, ntok, off in points])
                    if points:
                        nbytes = points[-1][2] - req.text.covered[BASE]
                        req.open_read[BASE] = ReadWork("base", nbytes, len(new))
                    else:
                        pending = 0                 # nothing to check: the base waits
                b.append(new)
                num = pending + len(new)
                rows.extend(plan[1] if req.mode == Mode.BASE else [p[1] for p in plan[1]])
            plans.append(plan)
            if num > 0:
                scored.append((req, prompt_rows(req, b.num_computed, num, start)))
                seqs.append((req, b))
                nums.append(num)
                start += num
        if not seqs:
            return plans
        # Section 2's raw distribution: top1 and argmax of the base's softmax at every row.
        extra = [r for _, rs in scored for r in rs]
        logits = self.models[BASE].forward([b for _, b in seqs], nums, rows + extra)
        at = len(rows)
        for req, rs in scored:
            if rs:
                self.engine.guard(req, record_prompt, req, logits[at:at + len(rs)])
                at += len(rs)
        logits = logits[:len(rows)]
        for (req, _), num in zip(seqs, nums):
            self._computed(req, BASE, num)
        top1, arg = torch.softmax(logits, -1).max(-1)
        host = host_read(torch.cat([top1.float(), arg.float()]))   # one read per base pass (ids exact in float32)
        n = top1.shape[0]
        stats = iter(zip(host[:n].tolist(), host[n:].long().tolist(), logits))   # row logits [vocab]: sampling
        out = []
        for req, plan in zip(reqs, plans):
            if plan is None:
                out.append(None)
            elif req.mode == Mode.BASE:
                out.append((plan[0], [next(stats) for _ in plan[1]]))
            else:
                out.append((plan[0], {q: (*next(stats), ntok, off) for q, _, ntok, off in plan[1]}))
        return out

    def _room(self, seq, want: int) -> int:
        """How many of `want` new tokens fit the pool: what the scheduler reserved, or more if free."""
        if seq.reserve(seq.num_tokens + want):
            return want
        return max(0, min(want, seq.num_reserved_slots - seq.num_tokens))

    def _words_to_check(self, req: CrossRequest):
        """Base tokens of the nudger's words up to its last word start in the queue, and for each word
        start: (queue index, base tokens before it, text offset). Word starts are piece boundaries, so
        converting segment by segment equals converting the whole."""
        tb = self.wp[NUDGER].token_bytes
        text = req.text
        pending_text = bytes(text.data[text.covered[BASE]:])
        offset, tokens, points = len(text.data), [], []
        seg = bytearray(pending_text)
        for q, t in enumerate(req.queue):
            if req.run + q > 0 and self._is_word_start(t):
                tokens += self.wp[BASE].encode(bytes(seg))
                points.append((q, len(tokens), offset))
                seg = bytearray()
            seg += tb[t]
            offset += len(tb[t])
        return tokens, points

    # ------------------------------------------------------------------ walks
    def _walk_base(self, req: CrossRequest, drafts: list[int], check) -> None:
        """Section 2 in BASE mode on the verified rows: accept drafts the base agrees with, emit its
        own token at the first disagreement (or bonus), switch to NUDGE where top1 < gamma. The
        base's token is its argmax or its sample; a draft only passes if it equals it (exact match)."""
        new, stats = check
        accepted, emitted = 0, None
        for j, (top1, a, row) in enumerate(stats):
            if top1 < req.gamma:
                req.mode, req.run = Mode.NUDGE, 0
                start_nudge_run(req)
                break
            t = base_token(req, row, a)
            agreed = j < len(new) and t == new[j]
            record_written(req, self.logprob_vocab, BASE, t, row)
            self._write(req, BASE, t)
            if not agreed:
                emitted = t               # a correction, or the bonus token after every draft
                break
            accepted += 1
            if req.finished:
                break
        req.accepted += accepted
        req.observe_drafts(len(new), accepted, emitted is not None and accepted < len(new))
        b = req.seqs[BASE]
        b.truncate(len(req.prompts[BASE]) + len(req.base_out) - (emitted is not None))
        if emitted is not None:
            b.append(emitted)

    def _agrees(self, req: CrossRequest, a: int, q: int):
        """The base's greedy token's text is a prefix of the nudger's next word (queue[q:])."""
        ab = self.wp[BASE].token_bytes[a]
        if not ab or any(c in WHITESPACE for c in ab[1:]):
            return False                  # no text (special), or not inside one word
        tb, word, n = self.wp[NUDGER].token_bytes, b"", 0
        for j, u in enumerate(req.queue[q:]):
            if j > 0 and starts_word(tb[u]):
                return word.startswith(ab)
            word += tb[u]
            n += 1
            if u in self.eos[NUDGER] or n >= AGREE_LOOKAHEAD or len(word) >= len(ab):
                return word.startswith(ab)
        return UNDECIDED if ab.startswith(word) else False

    def _walk_nudge(self, req: CrossRequest, checks) -> None:
        """Section 7 in NUDGE mode: the nudger's queued tokens are its text; at each word start the
        base (having read up to there) takes over if top1 >= gamma or it agrees."""
        words, checks = checks if checks is not None else ([], {})
        before = len(req.base_out)
        kept, consumed, resumed, resumed_row = 0, 0, None, None
        for q, t in enumerate(req.queue):
            if req.run > 0 and self._is_word_start(t):
                if q not in checks:
                    break                     # not verified this round (pool short): next round
                top1, a, row, ntok, off = checks[q]
                # The words before this point are final: they join the base's context.
                req.base_out += words[kept:ntok]
                req.base_src += [NUDGER] * (ntok - kept)
                kept = ntok
                req.text.covered[BASE] = off
                resume = top1 >= req.gamma or (req.resume_on_agreement and self._agrees(req, a, q))
                if resume is UNDECIDED:
                    break                     # keep the queue from here; draft more next round
                if resume:
                    resumed, resumed_row = base_token(req, row, a), row   # a fresh token from the base's p'
                    break
            record_queued(req, self.logprob_vocab, q, t)
            self._write(req, NUDGER, t)
            req.stable += 1
            req.run += 1
            consumed = q + 1
            if req.finished:
                break
        req.queue = [] if resumed is not None else req.queue[consumed:]
        req.queue_lp = [] if resumed is not None else req.queue_lp[consumed:]
        b = req.seqs[BASE]
        b.truncate(len(req.prompts[BASE]) + before + kept)
        if resumed is not None:
            req.mode = Mode.BASE
            req.seqs[NUDGER].truncate(req.stable)
            b.append(resumed)
            record_written(req, self.logprob_vocab, BASE, resumed, resumed_row)
            self._write(req, BASE, resumed)

    def _settle(self, req: CrossRequest) -> None:
        """Between rounds the newest token of each model is pending: the next pass gets its logits."""
        for seq in req.seqs:
            if seq.num_tokens:
                seq.set_num_computed(min(seq.num_computed, seq.num_tokens - 1))

    def _finish(self, req: CrossRequest) -> None:
        self.scheduler.finish(req.id)
        del self.engine.requests[req.id]
