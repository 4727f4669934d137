"""OpenAI-compatible HTTP serving: `nudge serve` (see docs/serving.md)."""
from .app import ServerSettings, build_app
from .async_engine import AsyncEngine, EngineDeadError, EngineStepError, QueueFullError

__all__ = ["AsyncEngine", "EngineDeadError", "EngineStepError", "QueueFullError", "ServerSettings", "build_app"]
