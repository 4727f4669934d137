"""The HTTP side of the server's answers (app.py): OpenAI-style errors, the streaming response that
aborts its engine requests however it ends, the client-disconnect watch, SSE lines, `echo`.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import math
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from . import protocol as P

RETRY_AFTER_S = 1                       # a 503's Retry-After: the queue drains within seconds


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | int | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(RETRY_AFTER_S)} if self.status == 503 else None
        return JSONResponse(P.error_body(self.message, self.type, self.param, self.code), status_code=self.status,
                            headers=headers)


def bad_request(message: str, param: str | None = None) -> APIError:
    if param is None:  # the engine's messages start with the field's name: "top_p must be in (0, 1], ..."
        word = message.split(" ", 1)[0]
        if word in _PARAM_NAMES:
            param = word
    return APIError(400, message, "invalid_request_error", param)


_PARAM_NAMES = set(P.CompletionRequest.model_fields) | set(P.ChatCompletionRequest.model_fields)


class _AbortingStreamingResponse(StreamingResponse):
    """Aborts the engine requests however the response ends (client gone, error, cancellation)."""

    def __init__(self, content, group, **kw):
        super().__init__(content, **kw)
        self._group = group

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._group.abort()      # no-op when every choice finished


class _ClientGone(Exception):
    pass


async def _wait_unless_disconnected(coro, request: Request):
    """Awaits coro, unless the client disconnects first (then raises _ClientGone)."""

    async def disconnected():
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    work = asyncio.ensure_future(coro)
    watch = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        if work in done:
            return work.result()
        raise _ClientGone()
    finally:
        for task in (work, watch):
            if not task.done():
                task.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.gather(work, watch, return_exceptions=True)


@dataclass
class Echo:
    """`echo: true`: the prompt goes before the completion, with the base model's logprobs of its tokens
    (the first has none: nothing predicts it), as vLLM and OpenAI's legacy completions return them."""

    text: str
    token_ids: list[int]   # the base model's prompt

    def logprobs(self, tokenizer, prompt_logprobs, n: int) -> tuple[dict, int]:
        entries = _clean_logprobs([e or {} for e in (prompt_logprobs or [])])
        out, offset = P.completion_logprobs(tokenizer, self.token_ids, entries, n, 0)
        if out["token_logprobs"]:
            out["token_logprobs"][0] = None
            out["top_logprobs"][0] = None
        return out, offset


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, allow_nan=False)}\n\n"


def _finite(x: float | None) -> float | None:
    if x is None:
        return None
    return x if math.isfinite(x) else -9999.0


def _clean_logprobs(entries):
    if entries is None:
        return None
    return [{t: _finite(v) for t, v in e.items()} for e in entries]
