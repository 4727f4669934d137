"""The one door from the device to the host during a round: every device-to-host read of the
token path goes through host_read, which counts it (engine.stats.host_reads beside stats.rounds).

A decode round reads once: the walk's packed result (accepted counts, emitted tokens, modes, the
drafts' values, the logprobs asked for). Extra reads, each counted: a round whose requests both
sample and decide greedily (one read per walk kind), prompt logprobs (one per prefill chunk that
holds prompt rows), and the text path (per pass; tests/test_host_reads.py states its bound).
"""
from __future__ import annotations

import torch


class HostReads:
    count = 0   # reads since the process started; the engine adds each step's difference to its stats


def host_read(t: torch.Tensor) -> torch.Tensor:
    """t on the host (the same tensor when it already is), counted as one device-to-host read."""
    HostReads.count += 1
    return t if t.device.type == "cpu" else t.to("cpu")
