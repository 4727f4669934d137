"""Decode-shaped passes replayed from captured graphs (CUDA graphs on a GPU, a replay emulation on the CPU).

A decode-shaped pass is one where every sequence has the same query length q: plain decoding and
the nudger's draft passes (q = 1), the base's verify pass (q = k + 1). Such a pass is padded to
the next captured batch size (1, 2, 4, 8, then multiples of 16) and run on static input buffers
that the step copies into; prefill and mixed chunks stay eager (model_runner.py).

Padded rows: their slot is PAD_SLOT, which every store path skips (store_kv_torch, kernels/store_kv.py,
kernels/rotary_store.py), so they write no K/V; their context is their own q positions on block
PAD_BLOCK (seq_len = q), so they read only there, and each of their queries sees at least one key
(no all-masked row, no NaN). Their logits are computed and dropped.

Logits: a captured pass computes the logits of every padded row (fixed shapes); the caller's rows
(`logits_indices`) are gathered from them afterwards, on the device.

GraphCapture: `CudaGraphCapture` captures with torch.cuda.graph into one shared memory pool;
`ReplayCapture` (the CPU) records the callable and replays it by calling it on the same static
buffers, so the padding and static-buffer logic runs in CPU tests. Only torch.cuda.graph is GPU-only.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Callable

import numpy as np
import torch

from ..layers.attention_metadata import NO_BLOCK, NO_SLOT
from .model_runner import ModelRunner, StepInputs

log = logging.getLogger("nudge_engine")

PAD_SLOT = NO_SLOT   # slot of a padded row: its K/V is not stored
PAD_BLOCK = 0        # block a padded row reads its (junk, never used) context from
PAD_TOKEN = 0        # input id of a padded row
CPU_GRAPHS_ENV = "NUDGE_CPU_GRAPHS"   # "replay": the CPU engine's default becomes the replay emulation
SMALL_BATCH_SIZES = (1, 2, 4, 8)
BATCH_SIZE_STEP = 16


def capture_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, 16, 32, ... up to the first size that holds max_num_seqs."""
    sizes: list[int] = []
    while not sizes or sizes[-1] < max_num_seqs:
        n = len(sizes)
        sizes.append(SMALL_BATCH_SIZES[n] if n < len(SMALL_BATCH_SIZES)
                     else BATCH_SIZE_STEP * (n - len(SMALL_BATCH_SIZES) + 1))
    return sizes


class ReplayCapture:
    """The CPU stand-in for a CUDA graph: 'capture' runs the callable once (as the GPU's warm-up
    does) and replay calls it again on the same static buffers.

    padded=False (the engine's emulation) replays on the live rows of the static buffers only:
    the CPU's GEMMs round differently for different row counts (M = 6 and M = 8 differ in the last
    bit), and the emulation must give the eager engine's tokens exactly. padded=True runs the
    whole padded shape, as the GPU does (tests/test_graph_runner.py checks it writes no K/V for
    padded rows and gives the live rows' logits within rounding)."""

    name = "replay"

    def __init__(self, padded: bool = False):
        self.padded = padded

    def capture(self, fn: Callable[..., None]) -> Callable[..., None]:
        fn(None)
        return fn if not self.padded else (lambda live: fn(None))

    def memory_bytes(self) -> int:
        return 0


class CudaGraphCapture:
    """torch.cuda.graph capture; all graphs of one model share one memory pool (captured largest
    first, so the smaller ones reuse its blocks)."""

    name = "cuda"

    def __init__(self, device: torch.device):
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: list = []
        self._start = torch.cuda.memory_reserved(device)

    def capture(self, fn: Callable[..., None]) -> Callable[..., None]:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up: Triton compiles and autotunes outside the capture
            fn(None)
        torch.cuda.current_stream(self.device).wait_stream(side)
        # Under tensor parallelism the warm-up ran NCCL collectives: let them finish, so NCCL's watchdog
        # thread has no pending work to poll while the capture runs (torch 2.7+ polls capture-safely anyway).
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            fn(None)
        self.graphs.append(graph)
        return lambda live: graph.replay()

    def memory_bytes(self) -> int:
        return torch.cuda.memory_reserved(self.device) - self._start


class GraphRunner:
    """Static buffers and one captured pass per (padded batch size, query length) for one model."""

    def __init__(self, runner: ModelRunner, max_num_seqs: int, query_lens: list[int], capture,
                 max_blocks_per_seq: int):
        self.runner = runner
        self.sizes = capture_batch_sizes(max_num_seqs)
        self.query_lens = sorted(set(query_lens))
        self.capture_impl = capture
        self.max_blocks = max_blocks_per_seq
        self.max_seq_len = max_blocks_per_seq * runner.block_size  # what every captured pass may read
        dev, i32 = runner.device, dict(dtype=torch.int32, device=runner.device)
        max_bs, max_tokens = self.sizes[-1], self.sizes[-1] * self.query_lens[-1]
        self.input_ids = torch.full((max_tokens,), PAD_TOKEN, dtype=torch.long, device=dev)   # [max_tokens]
        self.positions = torch.zeros(max_tokens, dtype=torch.long, device=dev)               # [max_tokens]
        self.slot_mapping = torch.full((max_tokens,), PAD_SLOT, dtype=torch.long, device=dev)  # [max_tokens]
        self.block_tables = torch.full((max_bs, max_blocks_per_seq), PAD_BLOCK, **i32)     # [max_bs, max_blocks]
        self.seq_lens = torch.full((max_bs,), self.query_lens[-1], **i32)                   # [max_bs]
        self.query_start_loc = torch.zeros(max_bs + 1, **i32)                               # [max_bs + 1]
        self._qsl = {q: torch.arange(max_bs + 1, **i32) * q for q in self.query_lens}       # q -> [max_bs + 1]
        self._graphs: dict[tuple[int, int], tuple[Callable, dict]] = {}
        self.capture_seconds = 0.0
        self.replays: dict[tuple[int, int], int] = {}   # (padded batch size, query length) -> replays

    # ------------------------------------------------------------------ capture
    def capture_all(self) -> None:
        started = time.perf_counter()
        for q in self.query_lens:
            for bs in reversed(self.sizes):  # largest first: the shared pool then fits the rest
                self._reset_pad(0, bs, q)
                out: dict = {}

                def fn(live, bs=bs, q=q, out=out):  # live: sequences to run (None: all bs; the CPU only)
                    n = bs if live is None else live
                    rows = torch.arange(n * q, device=self.runner.device)
                    out["logits"] = self.runner.forward(self._step(n, q), rows)  # [n * q, vocab]

                self._graphs[(bs, q)] = (self.capture_impl.capture(fn), out)
        self.capture_seconds = time.perf_counter() - started

    def _step(self, bs: int, q: int) -> StepInputs:
        n = bs * q
        return StepInputs(self.input_ids[:n], self.positions[:n], self.slot_mapping[:n], self.block_tables[:bs],
                          self.query_start_loc[:bs + 1], self.seq_lens[:bs], q, self.max_seq_len)

    # ------------------------------------------------------------------ replay
    def padded_size(self, batch) -> tuple[int, int] | None:
        """(padded batch size, query length) when the host-side batch is decode-shaped and captured."""
        qsl = batch.query_start_loc
        n = len(qsl) - 1
        if n < 1 or n > self.sizes[-1] or batch.block_tables.shape[1] > self.max_blocks:
            return None
        q = int(qsl[1] - qsl[0])
        if q not in self.query_lens or not bool(np.all(np.diff(qsl) == q)):
            return None
        return next(s for s in self.sizes if s >= n), q

    def run(self, batch, key: tuple[int, int], rows: torch.Tensor | None, override=None) -> torch.Tensor:
        """The batch's logits at `rows` of its flat tokens (default: each sequence's last token);
        override as in LoadedModel.forward (device-side input ids)."""
        n = self.load(batch, key, override)
        self.replay(key, n)
        return self.logits(key, torch.from_numpy(batch.logits_indices) if rows is None else rows)

    def load(self, batch, key: tuple[int, int], override=None) -> int:
        """Copies the host batch (and the override's device-side ids) into the static buffers -> live sequences."""
        arrays = (batch.input_ids, batch.positions, batch.slot_mapping, batch.block_tables, batch.seq_lens)
        n = self._put(key, *(torch.from_numpy(a) for a in arrays))
        if override is not None:
            index, values = override
            self.input_ids[:n * key[1]][slice(None) if index is None else index] = values
        return n

    def _put(self, key: tuple[int, int], input_ids, positions, slot_mapping, block_tables, seq_lens) -> int:
        """input_ids, positions, slot_mapping: [n * q]; block_tables: [n, w <= max_blocks]; seq_lens: [n]."""
        bs, q = key
        n = seq_lens.shape[0]
        t = n * q
        self.input_ids[:t].copy_(input_ids, non_blocking=True)
        self.positions[:t].copy_(positions, non_blocking=True)
        self.slot_mapping[:t].copy_(slot_mapping, non_blocking=True)
        w = block_tables.shape[1]
        self.block_tables[:n, :w].copy_(block_tables, non_blocking=True)
        self.block_tables[:n, w:] = NO_BLOCK
        self.seq_lens[:n].copy_(seq_lens, non_blocking=True)
        self._reset_pad(n, bs, q)
        return n

    def live_step(self, key: tuple[int, int], n: int, width: int) -> StepInputs:
        """The live rows of the loaded static buffers as one pass's inputs: what a tensor-parallel
        worker needs to replay the same graph (block tables cut to the batch's width)."""
        t = n * key[1]
        return StepInputs(self.input_ids[:t], self.positions[:t], self.slot_mapping[:t], self.block_tables[:n, :width],
                          self.query_start_loc[:n + 1], self.seq_lens[:n], key[1], self.max_seq_len)

    def replay_step(self, step: StepInputs, batch_size: int) -> None:
        """A worker's side of rank 0's replay: the same graph (padded batch size, query length) on its shard."""
        key = (batch_size, step.max_query_len)
        n = self._put(key, step.input_ids, step.positions, step.slot_mapping, step.block_tables, step.seq_lens)
        self.replay(key, n)

    def replay(self, key: tuple[int, int], n: int) -> None:
        self._graphs[key][0](n)
        self.replays[key] = self.replays.get(key, 0) + 1

    def logits(self, key: tuple[int, int], rows: torch.Tensor) -> torch.Tensor:
        """rows: [m] flat token rows of the last replay of `key` -> their logits [m, vocab]."""
        return self._graphs[key][1]["logits"][rows.to(self.runner.device)]

    def _reset_pad(self, n: int, bs: int, q: int) -> None:
        """Rows n..bs of a (bs, q) pass: no K/V written, q positions read from block PAD_BLOCK."""
        self.input_ids[n * q:bs * q] = PAD_TOKEN
        self.positions[n * q:bs * q] = 0
        self.slot_mapping[n * q:bs * q] = PAD_SLOT
        self.block_tables[n:bs] = PAD_BLOCK
        self.seq_lens[n:bs] = q
        self.query_start_loc[:bs + 1] = self._qsl[q][:bs + 1]


def make_graph_runner(runner: ModelRunner, mode: str, max_num_seqs: int, query_lens: list[int],
                      max_model_len: int, role: str) -> GraphRunner | None:
    """mode: 'cuda' (torch.cuda.graph), 'replay' (the CPU emulation) or 'eager' (None)."""
    if mode == "eager":
        return None
    if mode == "cuda" and runner.backend.name != "triton":
        log.info("%s model: CUDA graphs need the Triton backend (the torch backend syncs while planning); eager",
                 role)
        return None
    capture = CudaGraphCapture(runner.device) if mode == "cuda" else ReplayCapture()
    # A sequence never holds more blocks than its pool: a long context does not size the tables past it.
    max_blocks = min(-(-max_model_len // runner.block_size), runner.num_blocks)
    graphs = GraphRunner(runner, max_num_seqs, query_lens, capture, max_blocks)
    graphs.capture_all()
    log.info("%s model: %d decode graphs (%s) for batch sizes %s x query lengths %s in %.2f s, %.1f MiB",
             role, len(graphs._graphs), capture.name, graphs.sizes, graphs.query_lens, graphs.capture_seconds,
             capture.memory_bytes() / 2**20)
    return graphs


def graph_mode(enforce_eager: bool | None, device: torch.device) -> str:
    """enforce_eager (vLLM's name): None = graphs on CUDA, eager on the CPU (or the replay emulation
    when the environment sets NUDGE_CPU_GRAPHS=replay: whole test files run under it); False on
    the CPU = the replay emulation; True = eager everywhere."""
    if enforce_eager:
        return "eager"
    if device.type == "cuda":
        return "cuda"
    if enforce_eager is None:
        return "replay" if os.environ.get(CPU_GRAPHS_ENV) == "replay" else "eager"
    return "replay"


def graph_query_lens(num_models: int, draft_tokens: int) -> list[list[int]]:
    """Query lengths captured per model: decode (1) for both; the base's verify pass k + 1 for
    k = 1 .. draft_tokens when there is a nudger."""
    base = [1] + ([k + 1 for k in range(1, draft_tokens + 1)] if num_models > 1 else [])
    return [base] + [[1]] * (num_models - 1)


def graph_reserve_tokens(mode: str, max_num_seqs: int, num_models: int, draft_tokens: int) -> int:
    """Tokens of the largest captured pass (its activations live in the graph pool, apart from the
    eager allocator's), for KV sizing; 0 when eager."""
    if mode == "eager":
        return 0
    return capture_batch_sizes(max_num_seqs)[-1] * max(graph_query_lens(num_models, draft_tokens)[0])


def attach_graphs(models: list, mode: str, max_num_seqs: int, draft_tokens: int) -> None:
    """Captures each model's decode-shaped passes (models: LoadedModel, base first)."""
    for m, lens, role in zip(models, graph_query_lens(len(models), draft_tokens), ("base", "nudger")):
        m.graphs = make_graph_runner(m.runner, mode, max_num_seqs, lens, m.config.max_position_embeddings, role)
