"""What the engine thread (engine/async_engine.py) reports to its callers: the error classes, and the
fault-injection switch the server's tests use.
"""
from __future__ import annotations

import os

FAULT_ENV = "NUDGE_FAULT_INJECT"


class EngineDeadError(RuntimeError):
    """The engine thread is not running (stopped after an unrecoverable failure, or shutting down)."""


class ShuttingDownError(EngineDeadError):
    """The server's drain time-out ran out while this request was in flight."""


class QueueFullError(RuntimeError):
    """The waiting queue is full; the client should retry later."""


class EngineStepError(RuntimeError):
    """A step failed while this request was in flight; the request was aborted."""


class RequestFailedError(RuntimeError):
    """This request's own work failed in the engine; it ended alone and the others went on."""


class InvalidRequestError(ValueError):
    """The engine refused the request (add_request raised ValueError)."""


def fault_steps_from_env(environ: dict | None = None) -> frozenset[int]:
    raw = (environ if environ is not None else os.environ).get(FAULT_ENV, "").strip()
    if not raw:
        return frozenset()
    try:
        steps = frozenset(int(s) for s in raw.split(",") if s.strip())
    except ValueError:
        raise ValueError(f"{FAULT_ENV} must be step numbers separated by commas, got {raw!r}") from None
    if any(s < 1 for s in steps):
        raise ValueError(f"{FAULT_ENV}: step numbers start at 1, got {raw!r}")
    return steps
