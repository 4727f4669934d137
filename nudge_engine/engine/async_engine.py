"""AsyncEngine: NudgeEngine on its own thread, fed and read by an asyncio server.

The engine is not thread-safe, so exactly one thread touches it: the engine thread. Its loop
  1. takes new requests and aborts from a thread-safe inbox (add_request / abort happen here),
  2. runs engine.step() (one round for every scheduled request),
  3. publishes each request's new tokens to its group's asyncio.Queue, all of a step's events in
     ONE loop.call_soon_threadsafe call,
  4. publishes a snapshot (running / waiting requests, free KV blocks, counters) for /metrics.
The HTTP side only appends to the inbox and awaits its queue: it never blocks on the engine.

A *group* is one HTTP request: n choices (x prompts) = that many engine requests, added together
(all or none) and aborted together (client disconnect, server shutdown).

Admission (admission.py): at most max_num_seqs running plus max_queue waiting engine requests.

Failure design (engine.step() raises, e.g. a forward pass fails):
  - every in-flight request fails with an EngineStepError (the server sends an error chunk when
    streaming, a 500 otherwise): its state may be half-updated by the failed round, so it is not
    resumed;
  - every request is aborted in the engine, which frees both models' KV blocks;
  - if the engine is then clean (no request left, every pool block free) the loop goes on and
    serves new requests: a failure costs the requests in flight, not the server;
  - if it is not clean, or `max_consecutive_failures` steps in a row failed, or the failure is one
    no pass survives (a tensor-parallel worker died), the engine thread stops: new requests get 503
    and /health answers 503, so a supervisor restarts the process.
The error each in-flight request gets says which of the two happened.
Between steps, and every IDLE_WAIT_S while idle, the loop also reads `engine.broken` (a dead
tensor-parallel worker, noticed by its monitor): then it stops at once, before any request fails on it.

Test-only switch: NUDGE_FAULT_INJECT="3" (or "3,6") makes the base model's forward pass raise
in the 3rd (and 6th) engine step that has work, counted from server start.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Sequence

from .engine import NudgeEngine
from .request import RequestOutput, StreamDelta
from .sampling_params import NudgeParams, SamplingParams
from .admission import Admission
from .snapshot import EngineSnapshot, take_snapshot
from .async_errors import (FAULT_ENV, EngineDeadError, EngineStepError, InvalidRequestError, QueueFullError,  # noqa: F401
                            RequestFailedError, ShuttingDownError, fault_steps_from_env)

log = logging.getLogger("nudge_engine.server")

IDLE_WAIT_S = 0.5                 # the engine thread sleeps this long at most when it has nothing to do
MAX_IDLE_STEPS = 1000             # steps in a row without any token: the in-flight requests are failed
DEFAULT_MAX_CONSECUTIVE_FAILURES = 3


@dataclass
class GenerateItem:
    prompt: Any                    # what engine.add_request takes
    params: SamplingParams
    nudge: NudgeParams


@dataclass
class ChoiceDelta(StreamDelta):
    """New output of one choice, as the engine thread saw it after a step: the request's StreamDelta
    and where it belongs."""

    index: int = 0                       # the choice's place in its group (n > 1, batched prompts)
    output: RequestOutput | None = None  # set on the choice's last delta
    prompt_logprobs: list | None = None  # set on the choice's first delta, when the request asked for them


@dataclass
class GroupError:
    error: Exception


@dataclass
class _Choice:  # engine-thread side state of one engine request
    group: "RequestGroup"
    index: int
    request: Any                   # nudge_engine.engine.request.Request
    last_token_time: float | None = None


class RequestGroup:
    """One HTTP request's engine requests. Created and read on the event loop."""

    def __init__(self, owner: "AsyncEngine", items: Sequence[GenerateItem]):
        self.owner = owner
        self.items = list(items)
        self.n = len(self.items)
        self.loop = owner.loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.accepted: asyncio.Future = self.loop.create_future()
        self.arrival = time.monotonic()
        self.request_ids: list[int] = []
        self.done = False          # every choice finished, or the group failed / was aborted
        self._abort_sent = False

    async def wait_accepted(self) -> None:
        """Raises InvalidRequestError / EngineDeadError if the engine refused the group."""
        await self.accepted

    async def events(self) -> AsyncIterator[ChoiceDelta | GroupError]:
        """Deltas until every choice finished; a GroupError ends the stream."""
        remaining = self.n
        while remaining:
            ev = await self.queue.get()
            if isinstance(ev, GroupError):
                self.done = True
                yield ev
                return
            if ev.finish_reason is not None:
                remaining -= 1
                if not remaining:
                    self.done = True
            yield ev

    async def collect(self) -> list[RequestOutput]:
        """Waits for every choice; raises the group's error if it failed."""
        outputs: list[RequestOutput | None] = [None] * self.n
        async for ev in self.events():
            if isinstance(ev, GroupError):
                raise ev.error
            if ev.output is not None:
                outputs[ev.index] = ev.output
        return outputs  # type: ignore[return-value]

    def abort(self) -> None:
        """Frees the group's requests in the engine (no-op once it is done). Idempotent, any thread-free."""
        if self.done or self._abort_sent:
            return
        self._abort_sent = True
        self.done = True
        self.owner._send(("abort", self))


class AsyncEngine:
    def __init__(self, engine: NudgeEngine, *, max_queue: int = 512,
                 max_consecutive_failures: int = DEFAULT_MAX_CONSECUTIVE_FAILURES,
                 fault_steps: frozenset[int] | None = None, metrics: Any = None):
        self.engine = engine
        self.max_queue = max_queue
        self.max_consecutive_failures = max_consecutive_failures
        self.metrics = metrics     # observer with observe_ttft / observe_itl / observe_finish (or None)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._inbox: collections.deque = collections.deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._live: dict[int, _Choice] = {}          # engine request id -> choice (engine thread only)
        self._outbox: list[tuple[Callable, tuple]] = []
        self._pending_choices = 0                    # submitted, not yet accepted or refused (loop only)
        self.admission = Admission(engine.max_num_seqs, max_queue)
        self.dead_reason: str | None = None
        self.steps = 0                               # steps with work
        self.step_failures = 0
        self.recoveries = 0
        self._consecutive_failures = 0
        self._idle_steps = 0
        self._finish_counts: collections.Counter = collections.Counter()
        self._fault_steps = frozenset(fault_steps or ())
        self._fault_armed = False
        if self._fault_steps:
            self._install_fault_hook()
        self.names = ["base"] + (["nudger"] if engine.nudger is not None else [])
        self.snapshot = EngineSnapshot()
        self._publish_snapshot()

    # ------------------------------------------------------------------ loop side
    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.loop = loop or asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="nudge-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop.is_set()

    @property
    def num_waiting(self) -> int:
        """Admitted requests the engine does not run yet (submitted, queued or preempted)."""
        return max(0, self.admission.count - self.snapshot.running)

    def _release(self, n: int) -> None:
        self.admission.give_back(n)

    def _forget(self, rid: int) -> "_Choice | None":
        """Engine thread: a request leaves the engine (finished, failed or aborted); its place is free."""
        choice = self._live.pop(rid, None)
        if choice is not None:
            self._release(1)
        return choice

    async def submit(self, items: Sequence[GenerateItem]) -> RequestGroup:
        """Adds a group; returns once the engine accepted it (raises otherwise)."""
        if not self.alive:
            raise EngineDeadError(self.dead_reason or "the engine is not running")
        self.admission.take(len(items))
        group = RequestGroup(self, items)
        self._pending_choices += group.n
        try:
            self._send(("add", group))
            await group.wait_accepted()
        except BaseException:
            group.abort()           # cancelled while waiting (client gone): frees whatever was added
            raise
        finally:
            self._pending_choices -= group.n
        return group

    def _send(self, message: tuple) -> None:
        self._inbox.append(message)
        self._wake.set()

    def expire(self, reason: str) -> None:
        """Ends every request in flight with a ShuttingDownError (the drain time-out ran out); thread-safe."""
        self._send(("expire", reason))

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------------ engine thread
    def _post(self, fn: Callable, *args) -> None:
        self._outbox.append((fn, args))

    def _flush(self) -> None:
        if self._outbox and self.loop is not None:
            batch, self._outbox = self._outbox, []
            try:
                self.loop.call_soon_threadsafe(_dispatch, batch)
            except RuntimeError:    # the loop is closed: nobody is listening any more
                pass

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                broken = self.engine.broken
                if broken is not None:
                    self.dead_reason = f"{broken}; no pass can run again: restart the server"
                    log.error("the engine stops serving: %s", self.dead_reason)
                    break
                self._wake.clear()
                if self._inbox:
                    self._drain_inbox()
                    self._publish_snapshot()   # the queue check sees new requests as waiting at once
                if not self.engine.has_unfinished():
                    self._publish_snapshot()
                    self._flush()
                    self._wake.wait(IDLE_WAIT_S)
                    continue
                try:
                    touched = self._step()
                except Exception as e:  # noqa: BLE001 - any failure of a round is handled the same way
                    self._recover(e)
                else:
                    self._deliver(touched)
                self._publish_snapshot()
                self._flush()
        except BaseException as e:  # noqa: BLE001
            self.dead_reason = self.dead_reason or f"the engine thread stopped: {type(e).__name__}: {e}"
            log.error("%s\n%s", self.dead_reason, traceback.format_exc())
        finally:
            reason = self.dead_reason or "the server is shutting down"
            self._fail_all(EngineDeadError(reason), abort=True)
            # Requests that arrived after the loop ended are refused too.
            while self._inbox:
                kind, what = self._inbox.popleft()
                if kind == "add":
                    self._release(what.n)
                    self._post(_set_exception, what.accepted, EngineDeadError(reason))
            self._stop.set()
            self._publish_snapshot()
            self._flush()

    def _drain_inbox(self) -> None:
        while self._inbox:
            kind, what = self._inbox.popleft()
            if kind == "add":
                self._add_group(what)
            elif kind == "abort":
                self._abort_group(what)
            else:
                self._fail_all(ShuttingDownError(what), abort=True)

    def _add_group(self, group: RequestGroup) -> None:
        engine = self.engine
        added: list[int] = []
        try:
            for index, item in enumerate(group.items):
                rid = engine.add_request(item.prompt, item.params, item.nudge)
                added.append(rid)
                self._live[rid] = _Choice(group, index, engine.requests[rid])
        except Exception as e:  # noqa: BLE001
            for rid in added:
                self._live.pop(rid, None)
                engine.abort(rid)
            self._release(group.n)
            err = InvalidRequestError(str(e)) if isinstance(e, (ValueError, TypeError, OverflowError)) else e
            self._post(_set_exception, group.accepted, err)
            return
        group.request_ids = added
        self._post(_set_result, group.accepted, None)

    def _abort_group(self, group: RequestGroup) -> None:
        for rid in group.request_ids:
            if self._forget(rid) is not None:
                self.engine.abort(rid)
                self._finish_counts["abort"] += 1

    def _install_fault_hook(self) -> None:
        runner = self.engine.base.runner
        original = runner.forward

        def forward(*args, **kwargs):
            if self._fault_armed:
                self._fault_armed = False
                raise RuntimeError(f"injected fault ({FAULT_ENV}) in the base model's forward pass, step {self.steps}")
            return original(*args, **kwargs)

        runner.forward = forward

    def _step(self):
        self.steps += 1
        if self.steps in self._fault_steps:
            self._fault_armed = True
        touched = self.engine.step()
        self._consecutive_failures = 0
        self._idle_steps = 0 if touched else self._idle_steps + 1
        if self._idle_steps > MAX_IDLE_STEPS:
            self._idle_steps = 0
            raise RuntimeError(f"no request made progress in {MAX_IDLE_STEPS} steps "
                               "(the KV pools may be too small for the requests in flight)")
        return touched

    def _deliver(self, touched) -> None:
        now = time.monotonic()
        metrics = self.metrics
        for req in touched:
            choice = self._live.get(req.id)
            if choice is None:
                continue
            if req.finish_reason == "error":
                self._fail_group(choice.group, RequestFailedError(
                    f"the engine failed on this request ({req.error}); it was ended alone"))
                continue
            d = req.take_delta()  # holds back text that may still become a stop string
            if d.token_ids and metrics is not None:
                if choice.last_token_time is None:
                    metrics.observe_ttft(now - choice.group.arrival)
                else:
                    metrics.observe_itl((now - choice.last_token_time) / len(d.token_ids), len(d.token_ids))
            first = choice.last_token_time is None and (d.token_ids or req.finished)
            if d.token_ids:
                choice.last_token_time = now
            ev = ChoiceDelta(**vars(d), index=choice.index)
            prompt_logprobs = getattr(req, "prompt_logprobs", None)   # the text path has none
            if first and prompt_logprobs is not None:
                ev.prompt_logprobs = list(prompt_logprobs)
            if req.finished:
                ev.output = req.result()
                self._forget(req.id)
                self._finish_counts[req.finish_reason] += 1
                if metrics is not None:
                    metrics.observe_finish(req.finish_reason, now - choice.group.arrival)
            if d.token_ids or d.text or ev.finish_reason is not None:
                self._post(choice.group.queue.put_nowait, ev)

    def _fail_group(self, group: RequestGroup, error: Exception) -> None:
        """Ends one HTTP request: its other choices are aborted, its stream gets the error."""
        self._finish_counts["error"] += 1
        for rid in group.request_ids:
            if self._forget(rid) is not None and rid in self.engine.requests:
                self.engine.abort(rid)
                self._finish_counts["abort"] += 1
        self._post(group.queue.put_nowait, GroupError(error))

    def _fail_all(self, error: Exception, abort: bool) -> None:
        groups = {}
        self._finish_counts["error"] += len(self._live)
        for rid, choice in list(self._live.items()):
            groups[id(choice.group)] = choice.group
            if abort:
                try:
                    self.engine.abort(rid)
                except Exception:  # noqa: BLE001
                    log.exception("abort of request %d failed", rid)
        self._release(len(self._live))
        self._live.clear()
        for group in groups.values():
            self._post(group.queue.put_nowait, GroupError(error))

    def _recover(self, exc: Exception) -> None:
        """After a failed step: abort everything, decide whether the engine can go on, then tell each
        request in flight what happened, in the same words as the decision."""
        self.step_failures += 1
        self._consecutive_failures += 1
        cause = f"{type(exc).__name__}: {exc}"
        log.error("engine step %d failed (%s); failing the %d request(s) in flight\n%s",
                  self.steps, cause, len(self._live), traceback.format_exc())
        for rid in list(self.engine.requests):       # every request in flight, and anything else the engine holds
            try:
                self.engine.abort(rid)
            except Exception:  # noqa: BLE001 - judged below: the pools are then not free
                log.exception("abort of request %d failed", rid)
        if getattr(exc, "engine_fatal", False):   # e.g. a tensor-parallel worker died: no pass can run again
            self.dead_reason = f"{cause}; restart the server"
        elif self.engine.has_unfinished() or not self.engine.pools_all_free():
            self.dead_reason = "the engine could not free its KV pools after a failed step; restart the server"
        elif self._consecutive_failures >= self.max_consecutive_failures:
            self.dead_reason = f"{self._consecutive_failures} engine steps in a row failed (last: {cause}); restart the server"
        outcome = ("the request was aborted, and the server goes on serving new requests" if self.dead_reason is None
                   else f"the request was aborted, and the server stopped serving: {self.dead_reason}")
        self._fail_all(EngineStepError(f"the engine failed while this request was in flight ({cause}); {outcome}"),
                       abort=False)
        if self.dead_reason is not None:
            raise EngineDeadError(self.dead_reason)
        self.recoveries += 1

    def _publish_snapshot(self) -> None:
        self.snapshot = take_snapshot(self.engine, self.names, {
            "steps": self.steps, "step_failures": self.step_failures, "recoveries": self.recoveries,
            **{f"finished_{k}": v for k, v in self._finish_counts.items()}})


def _dispatch(batch: list[tuple[Callable, tuple]]) -> None:
    for fn, args in batch:
        fn(*args)


def _set_result(fut: asyncio.Future, value) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
