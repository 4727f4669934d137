"""AsyncNudgeEngine: the engine for asyncio programs (the role vLLM's AsyncLLM plays).

One NudgeEngine runs on its own thread (engine/async_engine.py: batching across every caller,
per-request failure isolation, recovery after a failed step); callers on the event loop only await:

    engine = AsyncNudgeEngine(NudgeEngine(base, nudger))
    async for delta in engine.stream("Question: ...", SamplingParams(max_tokens=64)):
        print(delta.text, end="")                      # delta: ChoiceDelta (token_ids, text, sources, ...)
    out = await engine.generate("Question: ...")       # RequestOutput
    engine.health()                                    # {"alive": ..., "running": ..., "waiting": ...}
    engine.shutdown()

Cancelling the awaiting task, or leaving the `async for` early, aborts the request and frees its KV
blocks. A request whose own work failed raises RequestFailedError (the others go on); a failed step
raises EngineStepError in every request then in flight; EngineDeadError once the thread has stopped.
The OpenAI-compatible server (nudge_engine/server/) is a layer of HTTP over this class.
"""
from __future__ import annotations

import asyncio
from typing import AsyncIterator

from .async_engine import AsyncEngine, ChoiceDelta, GenerateItem, GroupError, InvalidRequestError, RequestGroup
from .prompts import Prompt, tokenize_prompt
from .request import RequestOutput
from .sampling_params import NudgeParams, SamplingParams


class AsyncNudgeEngine(AsyncEngine):
    """AsyncEngine with the per-request API. The engine thread starts on first use, on the running loop."""

    async def _submit_one(self, prompt: Prompt, params: SamplingParams | None,
                          nudge: NudgeParams | None) -> RequestGroup:
        if self.loop is None:
            self.start()
        prompt = await self._tokenized(prompt)
        return await self.submit([GenerateItem(prompt, params or SamplingParams(), nudge or NudgeParams())])

    async def _tokenized(self, prompt: Prompt) -> Prompt:
        """Text and chat prompts as token ids, tokenized (and chat templates rendered, on their budget:
        model/chat_sandbox.py) on a worker thread: never on the event loop, never on the engine thread."""
        if not isinstance(prompt, (str, dict)):
            return prompt
        e = self.engine
        nudger_tok = e.nudger.tokenizer if e.nudger is not None else None
        try:
            base, nudger = await asyncio.to_thread(tokenize_prompt, prompt, e.base.tokenizer, nudger_tok, e.chat_format)
        except ValueError as err:
            raise InvalidRequestError(str(err)) from None
        return base if nudger is None else {"base": base, "nudger": nudger}

    async def stream(self, prompt: Prompt, params: SamplingParams | None = None,
                     nudge: NudgeParams | None = None) -> AsyncIterator[ChoiceDelta]:
        """The request's new output as each step decides it; the last delta has finish_reason and output."""
        group = await self._submit_one(prompt, params, nudge)
        try:
            async for ev in group.events():
                if isinstance(ev, GroupError):
                    raise ev.error
                yield ev
        finally:
            group.abort()       # no-op once finished; frees the request when cancelled or left early

    async def generate(self, prompt: Prompt, params: SamplingParams | None = None,
                       nudge: NudgeParams | None = None) -> RequestOutput:
        group = await self._submit_one(prompt, params, nudge)
        try:
            return (await group.collect())[0]
        finally:
            group.abort()

    def health(self) -> dict:
        """What a supervisor needs: whether the engine thread serves, why not, and the load."""
        snap = self.snapshot
        return {"alive": self.alive, "dead_reason": self.dead_reason, "running": snap.running,
                "waiting": self.num_waiting, "kv_free": dict(snap.kv_free), "steps": self.steps,
                "step_failures": self.step_failures}
