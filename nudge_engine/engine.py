"""NudgeEngine: the public API and the round loop (NUDGING.md sections 2 and 5).

One step = one round for every scheduled request:
  1. the nudger drafts (first pass: catch-up/prefill of its pending tokens, then one token per pass),
  2. the base model verifies every request's pending and draft tokens in ONE forward,
  3. the handoff walk decides accepted drafts, the emitted token, the new mode (all requests at once),
  4. rejected drafts roll back in both KV caches.
Without a nudger the same loop is plain continuous-batching decoding of the base model.
"""
from __future__ import annotations

import itertools
import logging
import time
from pathlib import Path
from typing import Iterator, Sequence

import torch
from tqdm import tqdm

from . import _core
from .draft_policy import DraftPolicy
from .handoff import Handoff
from .loader import resolve_device, resolve_dtype
from .model_pair import LoadedModel, load_models
from .model_runner import DEFAULT_BLOCK_SIZE
from .prompts import DEFAULT_BASE_TEMPLATE, ChatFormat, Prompt, tokenize_prompt
from .request import Mode, Request, RequestFailedError, RequestOutput, Source, StreamDelta
from .sampler import draw, processed_probs
from .sampling_params import NudgeParams, SamplingParams
from .stats import EngineStats
from .tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger("nudge_engine")

DEFAULT_GAMMA = 0.4
DEFAULT_DRAFT_TOKENS = 4
BASE_MODEL, NUDGER_MODEL = 0, 1
MIN_COST_RATIO = 0.05  # a nudger pass is never free: launch and host costs
MIN_BATCHED_TOKENS_NUDGING = 2
FAILED = object()     # what a guarded per-request call returns when the request failed this step
MAX_IDLE_STEPS = 1000  # steps without any emitted token before generate() gives up (chunked prefill emits none)


class NudgeEngine:
    pairing = "same-tokenizer"

    def __new__(cls, base, nudger=None, **kwargs):
        """A pair whose tokenizers differ gets the cross-tokenizer text path (NUDGING.md section 7)."""
        if nudger is not None and _tokenizers_differ(base, nudger):
            from .cross.engine import CrossTokenizerEngine
            return CrossTokenizerEngine(base, nudger, **kwargs)
        return super().__new__(cls)

    def __init__(
        self,
        base: str | Path,
        nudger: str | Path | None = None,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        gamma: float = DEFAULT_GAMMA,
        draft_tokens: int = DEFAULT_DRAFT_TOKENS,
        resume_on_agreement: bool = True,
        adaptive_drafting: bool = True,
        attention_backend: str = "auto",
        block_size: int = DEFAULT_BLOCK_SIZE,
        kv_cache_bytes: int | None = None,
        num_blocks: int | None = None,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 4096,
        base_template: str | None = None,      # None: the base model's chat template when alone
        response_prefix: str = "",
        seed: int = 0,
    ):
        self.defaults = NudgeParams(gamma=gamma, draft_tokens=draft_tokens, resume_on_agreement=resume_on_agreement,
                                    adaptive_drafting=adaptive_drafting)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        self.chat_format = ChatFormat(base_template or DEFAULT_BASE_TEMPLATE, response_prefix, base_template is None)
        paths = [Path(base)] + ([Path(nudger)] if nudger is not None else [])
        self.models = load_models(paths, self.device, self.dtype, attention_backend=attention_backend,
                                  block_size=block_size, kv_cache_bytes=kv_cache_bytes, num_blocks=num_blocks,
                                  max_num_batched_tokens=max_num_batched_tokens)
        configs = [m.config for m in self.models]
        if nudger is not None and max_num_batched_tokens < MIN_BATCHED_TOKENS_NUDGING:
            raise ValueError(f"max_num_batched_tokens must be >= {MIN_BATCHED_TOKENS_NUDGING} with a nudger "
                             f"(a round verifies at least one draft and the token before it), got {max_num_batched_tokens}")
        self.max_num_batched_tokens = max_num_batched_tokens
        self.scheduler = _core.Scheduler([m.pool for m in self.models], max_num_seqs, max_num_batched_tokens)
        self.eos_ids = frozenset(itertools.chain.from_iterable(c.eos_token_ids for c in configs))
        vocab = max(c.vocab_size for c in configs)
        table = self.models[-1].tokenizer.word_start_table()[:vocab]
        self.word_start = torch.zeros(vocab, dtype=torch.bool)        # [vocab]
        self.word_start[: len(table)] = torch.tensor(table, dtype=torch.bool)
        ratio = self.models[-1].num_parameters / self.base.num_parameters
        self.draft_policy = DraftPolicy(cost_ratio=max(ratio, MIN_COST_RATIO))
        self.handoff = Handoff(self.device, self.word_start, self.base.runner.backend.name == "triton")
        self.requests: dict[int, Request] = {}
        self._ids = itertools.count()
        self._seed_gen = torch.Generator().manual_seed(seed)
        self.stats = EngineStats()
        self._failed: dict[int, Exception] = {}   # request id -> what ended it, within one step
        log.info("same-tokenizer token path: base %s%s, %d KV blocks of %d tokens per model, "
                 "backend %s",
                 paths[0], f", nudger {paths[1]}" if nudger else "", self.base.pool.num_blocks, block_size,
                 self.models[0].runner.backend.name)

    # ------------------------------------------------------------------ public API
    @property
    def base(self) -> LoadedModel:
        return self.models[BASE_MODEL]

    @property
    def nudger(self) -> LoadedModel | None:
        return self.models[NUDGER_MODEL] if len(self.models) > 1 else None

    @property
    def tokenizer(self) -> Tokenizer:
        return self.base.tokenizer

    def add_request(self, prompt: Prompt, params: SamplingParams | None = None,
                    nudge: NudgeParams | None = None) -> int:
        params = params or SamplingParams()
        nudge = nudge or NudgeParams()
        nudger = self.nudger
        base_ids, nudger_ids = tokenize_prompt(prompt, self.base.tokenizer,
                                               nudger.tokenizer if nudger else None, self.chat_format)
        if not base_ids or (nudger is not None and not nudger_ids):
            raise ValueError("prompt is empty after tokenization")
        for m, ids, role in zip(self.models, (base_ids, nudger_ids), ("base", "nudger")):
            m.check_fits(role, len(ids), params.max_tokens)
        d = self.defaults
        rid = next(self._ids)
        gen = torch.Generator()
        gen.manual_seed(params.seed if params.seed is not None else int(torch.randint(2**62, (), generator=self._seed_gen)))
        req = Request(
            id=rid, base_prompt=base_ids, nudger_prompt=nudger_ids, params=params,
            nudger_params=nudge.nudger_sampling(params),
            gamma=(d.gamma if nudge.gamma is None else nudge.gamma) if nudger else 0.0,
            draft_tokens=d.draft_tokens if nudge.draft_tokens is None else nudge.draft_tokens,
            adaptive_drafting=d.adaptive_drafting if nudge.adaptive_drafting is None else nudge.adaptive_drafting,
            resume_on_agreement=d.resume_on_agreement if nudge.resume_on_agreement is None else nudge.resume_on_agreement,
            eos_ids=self.eos_ids, detok=IncrementalDetokenizer.after_prompt(self.base.tokenizer, base_ids),
            generator=gen,
        )
        if params.logprobs is not None:
            req.logprobs = []
        if params.prompt_logprobs is not None:
            req.prompt_logprobs = [None]
        req.base_seq = _core.Sequence(self.base.pool)
        req.base_seq.append(base_ids)
        seqs = [req.base_seq]
        if nudger is not None:
            req.nudger_seq = _core.Sequence(nudger.pool)
            seqs.append(req.nudger_seq)
        self.scheduler.add_request(rid, seqs)  # ValueError if the prompt can never fit the pools
        self.requests[rid] = req
        return rid

    def abort(self, request_id: int) -> None:
        req = self.requests.pop(request_id, None)
        if req is not None:
            self.scheduler.abort(request_id)
            req.abort()

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def pools_all_free(self) -> bool:
        return all(m.pool.all_free() for m in self.models)

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 nudge: NudgeParams | Sequence[NudgeParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """One result per prompt, in order. `params` / `nudge`: one for all, or one per prompt.
        A request whose own work failed comes back with finish_reason "error" and `error` set."""
        if isinstance(prompts, str) or (isinstance(prompts, dict)) or (
                isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        n = len(prompts)
        params_list = list(params) if isinstance(params, (list, tuple)) else [params] * n
        nudge_list = list(nudge) if isinstance(nudge, (list, tuple)) else [nudge] * n
        if len(params_list) != n or len(nudge_list) != n:
            raise ValueError(f"got {n} prompts but {len(params_list)} SamplingParams and {len(nudge_list)} NudgeParams")
        ids = []
        try:
            for p, sp, nps in zip(prompts, params_list, nudge_list):
                ids.append(self.add_request(p, sp, nps))
        except Exception:
            for rid in ids:
                self.abort(rid)
            raise
        results: dict[int, RequestOutput] = {}
        wanted = set(ids)
        with tqdm(total=n, desc="generate", disable=not use_tqdm) as bar:
            idle = 0
            while wanted - results.keys():
                touched = self.step()
                idle = 0 if touched else idle + 1
                if idle > MAX_IDLE_STEPS:
                    raise RuntimeError("the scheduler made no progress; KV pools may be too small for one request")
                for req in touched:
                    if req.finished and req.id in wanted:
                        results[req.id] = req.result()
                        bar.update(1)
        return [results[i] for i in ids]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None,
               nudge: NudgeParams | None = None) -> Iterator[StreamDelta]:
        """Yields tokens as they are decided; closing the iterator early aborts the request.
        Raises RequestFailedError if the request's own work failed (the tokens before it were yielded)."""
        rid = self.add_request(prompt, params, nudge)
        req = self.requests[rid]
        try:
            while not req.finished:
                self.step()
                delta = req.take_delta()
                if delta.finish_reason == "error":
                    raise RequestFailedError(req.error)
                if delta.token_ids or delta.text or delta.finish_reason:
                    yield delta
        finally:
            self.abort(rid)

    # ------------------------------------------------------------------ one round
    def step(self) -> list[Request]:
        """Runs one round for the scheduled requests; returns those that got tokens or finished.

        A failure in a request's own work (its sampling, its walk, its stop checks) ends that
        request alone with finish_reason "error"; the others go on. Only a failure of the batched
        passes, which belong to every request in them, propagates to the caller.
        """
        self._failed = {}
        for req in list(self.requests.values()):
            self._guard(req, self._prepare, req)
        ended = self._end_failed()
        sched = self.scheduler.schedule()
        self.stats.preemptions += len(sched.preempted)
        if not sched.req_ids:
            return ended
        reqs = [self.requests[i] for i in sched.req_ids]
        final = list(sched.is_final_chunk)
        drafts_k = [r.planned_drafts if f else 0 for r, f in zip(reqs, final)]
        started = time.perf_counter()
        drafts, draft_logits = self._draft(reqs, sched.num_new_tokens[NUDGER_MODEL] if self.nudger else None,
                                           drafts_k, final)
        drafted = time.perf_counter()
        base_logits, walk_rows, prompt_rows = self._verify(reqs, sched.num_new_tokens[BASE_MODEL], drafts, final)
        for entry in prompt_rows:
            if entry is not None:
                self._guard(entry[0], self._record_prompt_logprobs, entry, base_logits)
        finals = [i for i, f in enumerate(final) if f and reqs[i].id not in self._failed]
        decisions = self.handoff.decide([reqs[i] for i in finals], [drafts[i] for i in finals],
                                        [walk_rows[i] for i in finals], base_logits,
                                        [draft_logits[i] for i in finals])
        if max(drafts_k, default=0) > 0:  # the walk's copy back has waited for the base pass
            self.draft_policy.observe_pass_times((drafted - started) / max(drafts_k),
                                                 time.perf_counter() - drafted)
        touched = []
        for i, decision in zip(finals, decisions):
            req = reqs[i]
            if isinstance(decision, Exception):
                self._failed[req.id] = decision
            elif self._guard(req, self._apply, req, drafts[i], decision) is not FAILED:
                touched.append(req)
        return ended + touched + self._end_failed()

    def _guard(self, req: Request, fn, *args):
        """fn(*args), or FAILED (and the request marked to end) if it raises or the request already failed."""
        if req.id in self._failed:
            return FAILED
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - whatever it is, it belongs to this request alone
            self._failed[req.id] = e
            return FAILED

    def _end_failed(self) -> list[Request]:
        """Ends the requests that failed this step: their blocks go back to both pools."""
        ended = []
        for rid, exc in self._failed.items():
            req = self.requests.pop(rid, None)
            if req is None:
                continue
            log.error("request %d failed and was ended alone: %s: %s", rid, type(exc).__name__, exc,
                      exc_info=(type(exc), exc, exc.__traceback__))
            self.scheduler.abort(rid)
            req.fail(f"{type(exc).__name__}: {exc}")
            self.stats.failed_requests += 1
            ended.append(req)
        self._failed = {}
        return ended

    def _draft_count(self, req: Request) -> int:
        """Draft tokens this round: while nudging, the nudger writes anyway (at least one token);
        in BASE mode up to draft_tokens, fewer where the policy sees drafts not paying.

        Never more than the tokens the request may still emit: admission checked that prompt +
        max_tokens fits both contexts and both pools, so no draft reaches past a model's last
        position or a pool's capacity (and never past the step's token budget).
        """
        if req.nudger_seq is None:
            return 0
        if req.mode == Mode.NUDGE:
            k = max(req.draft_tokens, 1)
        elif not req.adaptive_drafting:
            k = req.draft_tokens
        else:
            k = self.draft_policy.choose(req.draft_stats, req.draft_tokens, measured=req.greedy)
        return min(k, req.params.max_tokens - len(req.output), self.max_num_batched_tokens - 1)

    def _prepare(self, req: Request) -> None:
        """Plans the request's drafts for this round. Lazy catch-up: the nudger sees the output only
        in rounds where it drafts."""
        k = req.planned_drafts = self._draft_count(req)
        if req.nudger_seq is None:
            self.scheduler.set_lookahead(req.id, [k])
            return
        if k > 0:
            if req.nudger_seq.num_tokens == 0:
                req.nudger_seq.append(req.nudger_prompt)
            seen = req.nudger_seq.num_tokens - len(req.nudger_prompt)
            if seen < len(req.output):
                req.nudger_seq.append(req.output[seen:])
        self.scheduler.set_lookahead(req.id, [k, max(k - 1, 0)])

    def _draft(self, reqs: list[Request], num_new: list[int] | None, k: list[int], final: list[bool]):
        """Nudger passes: catch-up + first draft, then one draft token per pass.

        A request that does not draft this round computes nothing in the nudger (lazy catch-up),
        except prefill chunks, which always keep the newest token pending.
        """
        drafts: list[list[int]] = [[] for _ in reqs]
        logits: list[list[torch.Tensor]] = [[] for _ in reqs]  # raw nudger logits row per draft
        if num_new is None:
            return drafts, logits
        active = [i for i, n in enumerate(num_new) if n > 0 and (k[i] > 0 or not final[i])]
        step_new = {i: num_new[i] for i in active}
        for j in range(max(k, default=0) + 1):
            if not active:
                break
            seqs = [reqs[i].nudger_seq for i in active]
            out = self.nudger.forward(seqs, [step_new[i] for i in active])
            picks = [i for i in active if len(drafts[i]) < k[i]]
            tokens = self._pick_drafts([reqs[i] for i in picks], out[[active.index(i) for i in picks]])
            for i in active:
                seq = reqs[i].nudger_seq
                seq.set_num_computed(seq.num_computed + step_new[i])
            for i, (tok, row) in zip(picks, tokens):
                if tok is FAILED:
                    continue
                drafts[i].append(tok)
                logits[i].append(row)
                reqs[i].nudger_seq.append(tok)
            active = [i for i in picks if len(drafts[i]) < k[i] and reqs[i].id not in self._failed]
            step_new = {i: 1 for i in active}
        return drafts, logits

    def _pick_drafts(self, reqs: list[Request], rows: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        if not reqs:
            return []
        tokens = rows.argmax(-1).tolist()
        sampled = [j for j, r in enumerate(reqs) if not r.nudger_params.greedy]
        if sampled:
            probs = processed_probs(rows[sampled].cpu(), [reqs[j].nudger_params for j in sampled])
            for j, p in zip(sampled, probs):
                tokens[j] = self._guard(reqs[j], draw, p, reqs[j].generator)
        return list(zip(tokens, rows))

    def _verify(self, reqs: list[Request], num_new: list[int], drafts: list[list[int]], final: list[bool]):
        """The base pass: pending + draft tokens of every request; logits rows for the walk."""
        nums, rows, walk_rows, prompt_rows = [], [], [], []
        start = 0
        for req, n, d, f in zip(reqs, num_new, drafts, final):
            if f and d:
                req.base_seq.append(d)
            total = n + (len(d) if f else 0)
            computed = req.base_seq.num_computed
            first = len(rows)
            if req.prompt_logprobs is not None and computed < len(req.base_prompt):
                upto = min(computed + total, len(req.base_prompt)) - 1  # row at position p predicts token p + 1
                rows.extend(range(start, start + upto - computed))
                prompt_rows.append((req, computed, len(rows) - first, first))
            else:
                prompt_rows.append(None)
            walk_first = len(rows)
            if f:
                rows.extend(range(start + total - len(d) - 1, start + total))
            walk_rows.append(slice(walk_first, len(rows)))
            nums.append(total)
            start += total
        logits = self.base.forward([r.base_seq for r in reqs], nums, rows)
        for req, n in zip(reqs, nums):
            req.base_seq.set_num_computed(req.base_seq.num_computed + n)
        return logits, walk_rows, prompt_rows

    @staticmethod
    def _record_prompt_logprobs(entry, logits) -> None:
        req, computed, count, first = entry
        if count <= 0:
            return
        lp = torch.log_softmax(logits[first:first + count], dim=-1).cpu()
        targets = req.base_prompt[computed + 1: computed + 1 + count]
        req.prompt_logprobs.extend(_top_logprobs(lp, targets, req.params.prompt_logprobs))

    def _apply(self, req: Request, drafts: list[int], decision) -> None:
        m, emit = decision.num_accepted, decision.emit_token
        tokens = drafts[:m] + ([emit] if emit is not None else [])
        sources = list(decision.accepted_sources[:m]) + ([Source.BASE] if emit is not None else [])
        was_mode = req.mode
        req.mode, req.run = Mode(decision.mode), decision.run
        req.rounds += 1
        req.drafted += len(drafts)
        req.accepted += m
        self.stats.record_round(len(drafts), m, sources, was_mode != req.mode)
        if was_mode == Mode.BASE:
            self._observe_drafts(req, len(drafts), decision)
        req.add_tokens(tokens, sources, decision.logprobs)
        if req.finished:
            self.scheduler.finish(req.id)
            del self.requests[req.id]
            return
        # The nudger's sequence holds this round's tokens only if it drafted (lazy catch-up otherwise).
        for seq in [req.base_seq] + ([req.nudger_seq] if drafts else []):
            seq.truncate(seq.num_tokens - (len(drafts) - m))
            if emit is not None:
                seq.append(emit)
            # Invariant between rounds: the newest token is pending in both models.
            seq.set_num_computed(min(seq.num_computed, seq.num_tokens - 1))

    @staticmethod
    def _observe_drafts(req: Request, drafted: int, decision) -> None:
        """Acceptance history of a round that began in BASE mode: drafts the base agreed with, and
        one rejection when it corrected a draft (a switch to nudging rejects nothing)."""
        stats = req.draft_stats
        if drafted == 0:
            stats.rounds_without_draft += 1
            return
        stats.rounds_without_draft = 0
        agreed = sum(1 for s in decision.accepted_sources if s == Source.BASE)
        corrected = (decision.emit_token is not None and decision.mode == Mode.BASE
                     and decision.num_accepted < drafted)
        stats.observe(agreed, int(corrected))


def _tokenizers_differ(base, nudger) -> bool:
    """False when a tokenizer cannot be read, so that __init__ reports the folder's problem as before."""
    try:
        return Tokenizer(Path(base)).vocab != Tokenizer(Path(nudger)).vocab
    except Exception:
        return False


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
