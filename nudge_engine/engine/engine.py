"""NudgeEngine: the public API and the round loop (NUDGING.md sections 2, 5 and 7).

The engine owns loading, the scheduler, the requests and the statistics. The per-round work belongs
to the pairing chosen once at construction (nudge_engine/pairing/): the base alone or a nudger with
the same tokenizer (the token path), or tokenizers that differ (the text path). One step = one round
for every scheduled request: the pairing plans each request's round, then drafts, verifies in ONE
base pass, decides and applies. Without a nudger the same loop is plain continuous-batching decoding.
"""
from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Iterator, Sequence

import torch
from tqdm import tqdm

from .. import _core
from ..model.loader import resolve_device, resolve_dtype
from ..model.model_pair import LoadedModel, load_models
from ..model.draft_graph import attach_draft_graphs
from ..model.graph_runner import attach_graphs, graph_mode, graph_reserve_tokens
from ..model.model_runner import DEFAULT_BLOCK_SIZE
from ..pairing import BASE_MODEL, NUDGER_MODEL, Pairing
from ..pairing.host_read import HostReads
from ..pairing.text import TextPairing
from ..pairing.token import FAILED, TokenPairing
from ..threads import set_threads
from .prompts import DEFAULT_BASE_TEMPLATE, ChatFormat, Prompt
from .request import RequestFailedError, RequestOutput, StreamDelta
from .sampling_params import NudgeParams, SamplingParams
from .stats import EngineStats
from ..model.tokenizer import Tokenizer

__all__ = ["NudgeEngine", "BASE_MODEL", "NUDGER_MODEL", "DEFAULT_GAMMA", "DEFAULT_DRAFT_TOKENS"]

log = logging.getLogger("nudge_engine")

DEFAULT_GAMMA = 0.4
DEFAULT_DRAFT_TOKENS = 4
MAX_IDLE_STEPS = 1000  # steps without any emitted token before generate() gives up (chunked prefill emits none)


class NudgeEngine:
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
        tensor_parallel_size: int = 1,          # > 1: the base sharded over that many processes/GPUs
        nudger_placement: str = "rank0",        # "rank0" (whole, rank 0 only) or "tensor" (see distributed/)
        enable_prefix_caching: bool = True,   # reuse the KV of shared prompt prefixes (README: Prefix caching)
        enforce_eager: bool | None = None,     # None: CUDA graphs on CUDA, eager on the CPU (graph_runner.py)
        threads: int | None = None,            # torch CPU threads; None: the cores this process may use (threads.py)
    ):
        self.defaults = NudgeParams(gamma=gamma, draft_tokens=draft_tokens, resume_on_agreement=resume_on_agreement,
                                    adaptive_drafting=adaptive_drafting)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        # torch's intra-op threads are process-wide: set on the CPU (and where asked for), else left as they are.
        self.threads = set_threads(threads) if threads is not None or self.device.type == "cpu" else \
            torch.get_num_threads()
        self.chat_format = ChatFormat(base_template or DEFAULT_BASE_TEMPLATE, response_prefix, base_template is None)
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.graph_mode = graph_mode(enforce_eager, self.device)   # every rank the same (distributed/shard.py)
        self.paths = [Path(base)] + ([Path(nudger)] if nudger is not None else [])
        self._tp = None
        if tensor_parallel_size != 1:
            self._tp = _start_tensor_parallel(tensor_parallel_size, nudger_placement, self.paths, device, dtype,
                                              attention_backend, block_size, kv_cache_bytes, num_blocks,
                                              max_num_batched_tokens, enable_prefix_caching, self.graph_mode,
                                              max_num_seqs, draft_tokens)
            self.models = self._tp.models
        else:
            self.models = load_models(self.paths, self.device, self.dtype, attention_backend=attention_backend,
                                      block_size=block_size, kv_cache_bytes=kv_cache_bytes, num_blocks=num_blocks,
                                      max_num_batched_tokens=max_num_batched_tokens,
                                      enable_prefix_caching=enable_prefix_caching,
                                      graph_tokens=graph_reserve_tokens(self.graph_mode, max_num_seqs,
                                                                        len(self.paths), draft_tokens))
            attach_graphs(self.models, self.graph_mode, max_num_seqs, draft_tokens)
            if len(self.models) > 1:
                attach_draft_graphs(self.models[1], draft_tokens)
        self.scheduler = _core.Scheduler([m.pool for m in self.models], max_num_seqs, max_num_batched_tokens)
        self.eos_ids = frozenset(itertools.chain.from_iterable(m.config.eos_token_ids for m in self.models))
        self.requests: dict = {}
        self._ids = itertools.count()
        self._seed_gen = torch.Generator().manual_seed(seed)
        self.stats = EngineStats()
        self.failed: dict[int, Exception] = {}   # request id -> what ended it, within one step
        differ = nudger is not None and self.base.tokenizer.vocab != self.nudger.tokenizer.vocab
        self._pair: Pairing = TextPairing(self) if differ else TokenPairing(self)

    def __getattr__(self, name: str):
        """What the pairing owns (the word-start table, the handoff, the text path's word pieces, ...)
        reads as the engine's, as it did when each path was its own engine class."""
        pair = self.__dict__.get("_pair")
        if pair is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(pair, name)

    # ------------------------------------------------------------------ public API
    @property
    def pairing(self) -> str:
        """ "base-alone", "same-tokenizer" (the token path) or "cross-tokenizer" (the text path)."""
        return self._pair.name

    @property
    def base(self) -> LoadedModel:
        return self.models[BASE_MODEL]

    @property
    def nudger(self) -> LoadedModel | None:
        return self.models[NUDGER_MODEL] if len(self.models) > 1 else None

    @property
    def tokenizer(self) -> Tokenizer:
        return self.base.tokenizer

    @property
    def broken(self) -> str | None:
        """Why no pass can ever run again (a tensor-parallel worker died), or None. The workers' monitor
        sets it even while the engine is idle (distributed/launch.py)."""
        return self._tp.broken if self._tp is not None else None

    def close(self) -> None:
        """Stops the tensor-parallel workers, if any (idempotent; also run at interpreter exit)."""
        if self._tp is not None:
            self._tp.close()

    def new_id(self) -> int:
        return next(self._ids)

    def add_request(self, prompt: Prompt, params: SamplingParams | None = None,
                    nudge: NudgeParams | None = None) -> int:
        req, seqs = self._pair.new_request(prompt, params or SamplingParams(), nudge or NudgeParams())
        self.scheduler.add_request(req.id, seqs)  # ValueError if the prompt can never fit the pools
        self.requests[req.id] = req
        return req.id

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
    def step(self) -> list:
        """Runs one round for the scheduled requests; returns those that got tokens or finished.

        A failure in a request's own work (its sampling, its walk, its stop checks) ends that
        request alone with finish_reason "error"; the others go on. Only a failure of the batched
        passes, which belong to every request in them, propagates to the caller.
        """
        self.failed = {}
        for req in list(self.requests.values()):
            self.guard(req, self._pair.prepare, req)
        ended = self._end_failed()
        sched = self.scheduler.schedule()
        self.stats.preemptions += len(sched.preempted)
        if not sched.req_ids:
            return ended
        reads = HostReads.count
        touched = self._pair.run_round([self.requests[i] for i in sched.req_ids], sched)
        self.stats.host_reads += HostReads.count - reads
        return ended + touched + self._end_failed()

    def guard(self, req, fn, *args):
        """fn(*args), or FAILED (and the request marked to end) if it raises or the request already failed."""
        if req.id in self.failed:
            return FAILED
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - whatever it is, it belongs to this request alone
            self.failed[req.id] = e
            return FAILED

    def _end_failed(self) -> list:
        """Ends the requests that failed this step: their blocks go back to both pools."""
        ended = []
        for rid, exc in self.failed.items():
            req = self.requests.pop(rid, None)
            if req is None:
                continue
            log.error("request %d failed and was ended alone: %s: %s", rid, type(exc).__name__, exc,
                      exc_info=(type(exc), exc, exc.__traceback__))
            self.scheduler.abort(rid)
            req.fail(f"{type(exc).__name__}: {exc}")
            self.stats.failed_requests += 1
            ended.append(req)
        self.failed = {}
        return ended


def _start_tensor_parallel(size: int, placement: str, paths: list[Path], device, dtype, attention_backend: str,
                           block_size: int, kv_cache_bytes, num_blocks, max_num_batched_tokens: int,
                           enable_prefix_caching: bool, mode: str, max_num_seqs: int, draft_tokens: int):
    """Starts the workers (nudge_engine/distributed/), loads rank 0's shards and captures their graphs
    (every rank the same ones) -> TensorParallelGroup."""
    from ..distributed.group import LaunchSpec, collective_timeout_s
    from ..distributed.launch import start
    spec = LaunchSpec(size, str(paths[0]), str(paths[1]) if len(paths) > 1 else None, placement, str(device),
                      str(dtype).removeprefix("torch."), attention_backend, block_size, kv_cache_bytes, num_blocks,
                      max_num_batched_tokens, collective_timeout_s(), enable_prefix_caching, mode, max_num_seqs,
                      draft_tokens)
    return start(spec)
