"""What runs before any route: the API key, the body size limit, and read time-outs for slow clients.

A slow client holds a connection (and, while its body trickles in, a task) without ever costing
the engine anything, but enough of them exhaust sockets: the headers must arrive within
`header_timeout` seconds of connecting (or of the previous response), and the WHOLE body within
`body_timeout` seconds of the headers, however it trickles in (one byte every few seconds never
resets the clock); otherwise the connection is closed (headers) or answered 408 and closed (body).
"""
from __future__ import annotations

import asyncio
import json
import secrets

from uvicorn.protocols.http.h11_impl import H11Protocol

from . import protocol as P

DEFAULT_HEADER_TIMEOUT_S = 30.0
DEFAULT_BODY_TIMEOUT_S = 30.0
UNAUTHENTICATED_PATHS = ("/health",)


class GuardMiddleware:
    """API key (every route but /health), the body size limit and the body read time-out, before
    anything parses the body. Every POST body is handed on as JSON."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int, body_timeout: float = DEFAULT_BODY_TIMEOUT_S):
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.api_key is not None and scope.get("path") not in UNAUTHENTICATED_PATHS:
            auth = headers.get(b"authorization", b"")
            scheme, _, token = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not secrets.compare_digest(token.strip(), self.api_key):
                return await send_error(send, 401, P.error_body(
                    "missing or wrong API key: send 'Authorization: Bearer <key>'", "authentication_error",
                    None, "invalid_api_key"), [(b"www-authenticate", b"Bearer")])
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        limit = self.max_body_bytes
        too_big = P.error_body(f"the request body is larger than the limit of {limit} bytes", "invalid_request_error",
                               None, "request_too_large")
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                return await send_error(send, 400, P.error_body("malformed Content-Length header"))
            if declared > limit:
                return await send_error(send, 413, too_big)
        chunks, size = [], 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout     # for the whole body: a trickle does not reset it
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0))
            except asyncio.TimeoutError:
                return await send_error(send, 408, P.error_body(
                    f"the request body ({size} bytes so far) did not arrive in full within {self.body_timeout:g} s "
                    "of its headers (--body-timeout)", "invalid_request_error", None, "request_timeout"),
                    [(b"connection", b"close")])
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return await send_error(send, 413, too_big)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False
        # Every POST body here is JSON: read it as JSON whatever Content-Type says (curl -d sends a form type).
        scope = dict(scope)
        scope["headers"] = [(k, v) for k, v in scope.get("headers") or [] if k != b"content-type"] + [
            (b"content-type", b"application/json")]

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()   # after the body: waits for the client to disconnect

        return await self.app(scope, replay, send)


async def send_error(send, status: int, body: dict, extra_headers=()) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *extra_headers]})
    await send({"type": "http.response.body", "body": data})


def header_timeout_protocol(timeout: float = DEFAULT_HEADER_TIMEOUT_S) -> type:
    """uvicorn's h11 protocol, closing connections whose request headers do not arrive in time."""

    class HeaderTimeoutH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def data_received(self, data: bytes) -> None:
            cycle = self.cycle
            super().data_received(data)
            if self.cycle is not cycle:   # a new request's headers are complete
                self._disarm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            if not self.transport.is_closing():
                self._header_timer = self.loop.call_later(timeout, self._expired)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expired(self) -> None:
            self._header_timer = None
            if self.cycle is None or self.cycle.response_complete:
                self.transport.close()

    return HeaderTimeoutH11Protocol
