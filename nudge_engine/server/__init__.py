"""OpenAI-compatible HTTP serving: `nudge serve` (see docs/serving.md).

app.py (routes, settings over nudge_engine.AsyncNudgeEngine, engine/async_engine.py), limits.py (what one
request can hold; defaulted max_tokens), draining.py (SIGTERM drain), protocol.py (request/response
shapes), openapi.py, guard.py (slow-client and body limits), metrics.py.

May import: engine/ (NudgeEngine and the request side), model/ (tokenizer). Nothing imports server/
except the CLI.
"""
from .app import ServerSettings, build_app
from ..engine.async_engine import AsyncEngine, EngineDeadError, EngineStepError, QueueFullError

__all__ = ["AsyncEngine", "EngineDeadError", "EngineStepError", "QueueFullError", "ServerSettings", "build_app"]
