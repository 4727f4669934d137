"""What the async engine's thread publishes after each step for /health and /metrics (engine/async_engine.py):
a plain copy, so the event loop reads it without touching the engine."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EngineSnapshot:
    running: int = 0
    waiting: int = 0
    kv_free: dict[str, int] = field(default_factory=dict)
    kv_total: dict[str, int] = field(default_factory=dict)
    prefix_cache: dict[str, tuple[int, int]] = field(default_factory=dict)  # model -> (hit, query) tokens
    counters: dict[str, int] = field(default_factory=dict)


def take_snapshot(engine, names: list[str], counters: dict[str, int]) -> EngineSnapshot:
    """Engine thread only. names: one per model (base, nudger); counters: the async engine's own."""
    s = engine.stats
    models = list(zip(names, engine.models))
    return EngineSnapshot(
        running=int(engine.scheduler.num_running),
        waiting=int(engine.scheduler.num_waiting),
        kv_free={name: int(m.pool.num_free) for name, m in models},
        kv_total={name: int(m.pool.num_blocks) for name, m in models},
        prefix_cache={name: (int(m.pool.prefix_cache_hit_tokens), int(m.pool.prefix_cache_query_tokens))
                      for name, m in models},
        counters={
            "rounds": s.rounds, "drafted_tokens": s.drafted_tokens, "accepted_tokens": s.accepted_tokens,
            "base_tokens": s.base_tokens, "nudger_tokens": s.nudger_tokens, "handoffs": s.handoffs,
            "preemptions": s.preemptions, **counters,
        },
    )
