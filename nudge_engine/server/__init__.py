"""OpenAI-compatible HTTP serving: `nudge serve` (see docs/serving.md).

app.py (routes, settings), async_engine.py (the engine thread), protocol.py (request/response
shapes), openapi.py, guard.py (slow-client and body limits), metrics.py.

May import: engine/ (NudgeEngine and the request side), model/ (tokenizer). Nothing imports server/
except the CLI.
"""
from .app import ServerSettings, build_app
from .async_engine import AsyncEngine, EngineDeadError, EngineStepError, QueueFullError

__all__ = ["AsyncEngine", "EngineDeadError", "EngineStepError", "QueueFullError", "ServerSettings", "build_app"]
