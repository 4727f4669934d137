"""uvicorn's server with the drain `nudge serve` promises on SIGTERM (README: How it runs; failures)."""
from __future__ import annotations

import asyncio
import signal

import uvicorn

DRAIN_GRACE_S = 5            # after --drain-timeout: time for the error chunks to reach the clients


class DrainingServer(uvicorn.Server):
    """SIGTERM: stop accepting, let in-flight requests finish (up to --drain-timeout), then end the
    rest with an error (streams get an error chunk and [DONE]), exit with status 0.

    Plain uvicorn re-raises the signal after its graceful shutdown, so the process would end
    "killed by SIGTERM" even after a clean drain.
    """

    def __init__(self, config, drain_timeout: float, on_drain_timeout):
        super().__init__(config)
        self.drain_timeout = drain_timeout
        self.on_drain_timeout = on_drain_timeout

    async def shutdown(self, sockets=None):
        timer = asyncio.get_running_loop().call_later(self.drain_timeout, self.on_drain_timeout)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()

    def handle_exit(self, sig, frame):
        super().handle_exit(sig, frame)
        captured = getattr(self, "_captured_signals", None)
        if sig == signal.SIGTERM and isinstance(captured, list) and sig in captured:
            captured.remove(sig)
