"""nudge_engine: exact, fast nudging (a base model writes; a small aligned model writes where it is unsure).

Names are imported on first use, so `nudge --help` and the server's CLI parsing do not pay for torch.
"""
from importlib import import_module

from .threads import prefer_passive_wait

prefer_passive_wait()   # before torch loads its OpenMP runtime (nudge_engine/threads.py says why)

_EXPORTS = {
    "AsyncNudgeEngine": ".engine.async_nudge_engine",
    "NudgeEngine": ".engine.engine",
    "NudgeParams": ".engine.sampling_params",
    "SamplingParams": ".engine.sampling_params",
    "RequestOutput": ".engine.request",
    "StreamDelta": ".engine.request",
    "ModelFolderError": ".model.errors",
    "load_model": ".model.scoring",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'nudge_engine' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name], __name__), name)
