"""The engine side: NudgeEngine and what a request is.

engine.py (NudgeEngine: loading, scheduler, requests, public API, statistics; the per-round work is
the pairing's), request.py (Request, RequestOutput, StreamDelta), sampling_params.py (SamplingParams,
NudgeParams), prompts.py (prompt forms and chat rendering), sampler.py (processed distributions,
seeded draws), draft_policy.py (adaptive draft length), stats.py (EngineStats),
async_engine.py + async_nudge_engine.py + async_errors.py + admission.py (the queue limit) + snapshot.py
(AsyncNudgeEngine: the engine on its own thread for asyncio callers; the server builds on it).

May import: model/, distributed/ (engine.py only, lazily, for tensor_parallel_size > 1). Only engine.py imports pairing/; pairing/ imports the other modules here, never
engine.py, so the modules form no import circle. `from nudge_engine.engine import NudgeEngine` works
(names below are imported on first use).
"""
from importlib import import_module

_EXPORTS = ("NudgeEngine", "BASE_MODEL", "NUDGER_MODEL", "DEFAULT_GAMMA", "DEFAULT_DRAFT_TOKENS")


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'nudge_engine.engine' has no attribute {name!r}")
    return getattr(import_module(".engine", __name__), name)
