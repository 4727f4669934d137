"""What the draft plan saw, written down so that a plan can be replayed (engine/draft_policy.py).

With NUDGE_DRAFT_LOG=path in the environment, the token path's DraftPolicy appends one JSON line per
call that changes or uses its state: every round's observation (`observe`: the draft and verify
timings, their sizes, the overhead, the verify pass's shape, the tokens the round wrote) and every
plan (`plan`: each request's acceptance counts, rounds without a draft, cap, mode, fixed count and
pending tokens, and the draft counts chosen). The first line holds the policy's settings.

`replay(lines)` feeds the same sequence to a fresh DraftPolicy and returns, per plan, what was chosen
then and what the policy chooses now: a bad plan seen on a loaded machine can be rerun, stepped
through and fixed without the machine (tests/test_draft_policy.py replays one).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable

from .draft_policy import DraftPolicy, DraftStats, PlanEntry

LOG_ENV = "NUDGE_DRAFT_LOG"


def file_recorder(path: str | Path) -> Callable[[dict], None]:
    """A recorder that appends each record as one JSON line to `path` (flushed: a crash keeps what came before)."""
    out = open(path, "a", buffering=1)   # noqa: SIM115 - lives as long as the policy

    def record(item: dict) -> None:
        out.write(json.dumps(item) + "\n")
    return record


def start_record(policy: DraftPolicy) -> dict:
    """The settings a replay needs to rebuild the policy (the first record of a log)."""
    return {"policy": {"cost_ratio": policy.static_cost_ratio, "padded_queries": policy.padded_queries}}


def attach(policy: DraftPolicy, recorder: Callable[[dict], None]) -> None:
    recorder(start_record(policy))
    policy.recorder = recorder


def attach_from_env(policy: DraftPolicy) -> DraftPolicy:
    """policy, recording into $NUDGE_DRAFT_LOG when that is set."""
    path = os.environ.get(LOG_ENV)
    if path:
        attach(policy, file_recorder(path))
    return policy


def entry_from_record(values: list) -> PlanEntry:
    accepted, rejected, nudge_accepted, nudge_rejected, rounds_without_draft, probe_gap, cap, nudging, fixed, pending \
        = values
    stats = DraftStats(accepted=accepted, rejected=rejected, rounds_without_draft=rounds_without_draft,
                       probe_gap=probe_gap, nudge_accepted=nudge_accepted, nudge_rejected=nudge_rejected)
    return PlanEntry(stats=stats, cap=cap, nudging=nudging, fixed=fixed, pending=pending)


def read_log(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def replay(records: Iterable[dict], policy: DraftPolicy | None = None) -> list[tuple[list[int], list[int]]]:
    """[(recorded ks, replayed ks)] per plan, the observations fed in their order. policy: the one to
    replay into (default: a fresh one with the log's settings)."""
    plans = []
    for item in records:
        if "policy" in item:
            policy = policy or DraftPolicy(**item["policy"])
        elif "observe" in item:
            draft_s, passes, draft_tokens, verify_s, verify_tokens, overhead_s, uniform, emitted, prediction = \
                item["observe"]
            policy.observe_round(draft_s, passes, draft_tokens, verify_s, verify_tokens, overhead_s, uniform, emitted,
                                 tuple(prediction) if prediction is not None else None)
        elif "plan" in item:
            plans.append((item["ks"], policy.plan_round([entry_from_record(v) for v in item["plan"]])))
    return plans
