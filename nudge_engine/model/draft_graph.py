"""The nudger's draft passes after the first as ONE captured graph (pairing/device_drafts.py).

After a round's first nudger pass (which also catches up what the nudger had not seen), each further
pass reads one token per drafting request, the previous pass's argmax, and writes one more. When every
drafting request makes the same number R of further passes, those R passes run as one graph per
(padded batch size, R): its static inputs are the first input ids (on the device), each step's
positions and slots (one host batch build for all R steps: the scheduler reserved the lookahead
slots), the block tables and the sequences' lengths; inside, step t computes its lengths, runs a
decode pass, takes the argmax into row t of `out` and feeds it to step t + 1. One replay replaces
R Python passes, R host batch builds and R input copies.

Greedy drafts only (the argmax is the whole draw): a sampled nudger row needs its request's generator,
and such rounds keep the per-pass loop, as do rounds whose requests draft different counts.
Padded rows read their own t + 1 positions of block PAD_BLOCK and write no K/V (PAD_SLOT), as in
graph_runner.py. On the CPU the graph is the replay emulation (graph_runner.ReplayCapture).
"""
from __future__ import annotations

import logging
import time
from typing import Callable

import torch

from ..layers.attention_metadata import NO_BLOCK
from .graph_runner import PAD_BLOCK, PAD_SLOT, PAD_TOKEN, GraphRunner
from .model_runner import StepInputs

log = logging.getLogger("nudge_engine")


class DraftGraphs:
    """One nudger's multi-pass draft graphs, sharing its GraphRunner's capture (and CUDA memory pool)."""

    def __init__(self, graphs: GraphRunner, max_steps: int):
        self.runner, self.capture_impl = graphs.runner, graphs.capture_impl
        self.sizes, self.max_steps = graphs.sizes, max_steps
        self.max_blocks, self.max_seq_len = graphs.max_blocks, graphs.max_seq_len
        dev, i32 = self.runner.device, dict(dtype=torch.int32, device=self.runner.device)
        bs = self.sizes[-1]
        self.first_ids = torch.full((bs,), PAD_TOKEN, dtype=torch.long, device=dev)           # [max_bs]
        self.positions = torch.arange(max_steps, device=dev)[:, None].repeat(1, bs)         # [max_steps, max_bs]
        self.slots = torch.full((max_steps, bs), PAD_SLOT, dtype=torch.long, device=dev)      # [max_steps, max_bs]
        self.block_tables = torch.full((bs, self.max_blocks), PAD_BLOCK, **i32)              # [max_bs, max_blocks]
        self.start_lens = torch.ones(bs, **i32)         # [max_bs] sequence length at step 0 (its input included)
        self.query_start_loc = torch.arange(bs + 1, **i32)                                    # [max_bs + 1]
        self.rows = torch.arange(bs, device=dev)                                              # [max_bs]
        self.out = torch.zeros(max_steps, bs, dtype=torch.long, device=dev)                   # [max_steps, max_bs]
        self._graphs: dict[tuple[int, int], Callable] = {}
        self.replays: dict[tuple[int, int], int] = {}
        self.capture_seconds = 0.0

    def capture_all(self) -> None:
        """At start-up, on all-padded buffers (nothing written): a capture later, mid-round, would
        synchronize the device inside the draft loop."""
        started = time.perf_counter()
        for steps in range(1, self.max_steps + 1):
            for bs in reversed(self.sizes):
                self._graphs[(bs, steps)] = self.capture_impl.capture(
                    lambda live, bs=bs, steps=steps: self._passes(bs if live is None else live, steps))
        self.capture_seconds = time.perf_counter() - started

    def fits(self, n: int, steps: int, width: int) -> bool:
        return 1 <= steps <= self.max_steps and 1 <= n <= self.sizes[-1] and width <= self.max_blocks

    def run(self, batch, first_ids: torch.Tensor, steps: int) -> torch.Tensor:
        """batch: the host batch of every request's `steps` further draft positions (num_new = steps
        each); first_ids [n] int64 on the device: the first pass's drafts -> the next `steps`
        drafts of each request, [steps, n] int64 on the device."""
        n = batch.seq_lens.shape[0]
        bs = next(s for s in self.sizes if s >= n)
        self._load(batch, first_ids, n, bs, steps)
        key = (bs, steps)
        self._graphs[key](n)
        self.replays[key] = self.replays.get(key, 0) + 1
        return self.out[:steps, :n]

    def _passes(self, n: int, steps: int) -> None:
        ids = self.first_ids[:n]
        for t in range(steps):
            step = StepInputs(ids, self.positions[t, :n], self.slots[t, :n], self.block_tables[:n],
                              self.query_start_loc[:n + 1], self.start_lens[:n] + t, 1, self.max_seq_len)
            logits = self.runner.forward(step, self.rows[:n])   # [n, vocab]
            self.out[t, :n] = logits.argmax(-1)
            ids = self.out[t, :n]

    def _load(self, batch, first_ids: torch.Tensor, n: int, bs: int, steps: int) -> None:
        def steps_by_seq(a):   # host [n * steps] (sequence-major) -> [steps, n] on the device
            return torch.from_numpy(a).view(n, steps).t().to(self.runner.device, non_blocking=True)
        self.first_ids[:n].copy_(first_ids)
        self.positions[:steps, :n].copy_(steps_by_seq(batch.positions))
        self.slots[:steps, :n].copy_(steps_by_seq(batch.slot_mapping))
        tables = torch.from_numpy(batch.block_tables)
        self.block_tables[:n, :tables.shape[1]].copy_(tables, non_blocking=True)
        self.block_tables[:n, tables.shape[1]:] = NO_BLOCK
        self.start_lens[:n].copy_(torch.from_numpy(batch.seq_lens) - steps + 1, non_blocking=True)
        # Padded rows: step t reads positions 0..t of PAD_BLOCK and writes nothing.
        self.first_ids[n:bs] = PAD_TOKEN
        self.positions[:steps, n:bs] = torch.arange(steps, device=self.positions.device)[:, None]
        self.slots[:steps, n:bs] = PAD_SLOT
        self.block_tables[n:bs] = PAD_BLOCK
        self.start_lens[n:bs] = 1


def attach_draft_graphs(nudger, draft_tokens: int) -> None:
    """nudger: LoadedModel with its decode graphs (a single-process GraphRunner) -> its draft graphs."""
    graphs = getattr(nudger, "graphs", None)
    nudger.draft_graphs = None
    if type(graphs) is GraphRunner and draft_tokens >= 2:
        nudger.draft_graphs = DraftGraphs(graphs, draft_tokens - 1)
        nudger.draft_graphs.capture_all()
        log.info("nudger model: %d draft graphs (%s) for batch sizes %s x 1..%d further passes in %.2f s, "
                 "%.1f MiB with its decode graphs", len(nudger.draft_graphs._graphs), graphs.capture_impl.name,
                 graphs.sizes, draft_tokens - 1, nudger.draft_graphs.capture_seconds,
                 graphs.capture_impl.memory_bytes() / 2**20)
