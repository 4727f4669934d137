"""Process group set-up: which rank this is, its device, and the torch.distributed group (no own comms).

A spawned engine owns its group: rank 0 opens a TCPStore of its own (a free port), and every rank
builds the gloo or NCCL backend on it directly (ProcessGroupGloo / ProcessGroupNCCL), never touching
the process's default group, so one process can hold several tensor-parallel engines at once, each
with its own workers. Under torchrun the group is the default one (env:// rendezvous), one engine.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..layers.parallel import TensorParallel

# Every collective (the step broadcast, the all-reduces, the logits gather) gives up after this long,
# so a worker that hangs ends the engine instead of hanging it. Loading a large shard happens between
# two collectives, hence the generous default; NUDGE_TP_TIMEOUT_S overrides it.
DEFAULT_TIMEOUT_S = 600.0
TIMEOUT_ENV = "NUDGE_TP_TIMEOUT_S"
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class LaunchSpec:
    """What every rank needs to load its models: picklable, sent to spawned workers."""

    tp_size: int
    base: str
    nudger: str | None
    nudger_placement: str
    device: str                  # "cpu", "cuda" or "cuda:K" as the user gave it; each rank adds its local rank
    dtype: str
    attention_backend: str
    block_size: int
    kv_cache_bytes: int | None
    num_blocks: int | None
    max_num_batched_tokens: int
    timeout_s: float
    enable_prefix_caching: bool = False   # rank 0's block pools (the scheduler's) only
    graph_mode: str = "eager"             # model/graph_runner.py: "cuda", "replay" or "eager", the same on every rank
    max_num_seqs: int = 256               # sizes the captured batch sizes
    draft_tokens: int = 4                 # sizes the base's captured verify passes

    @property
    def num_models(self) -> int:
        return 1 + (self.nudger is not None)

    @property
    def tp_models(self) -> list[str]:
        """The models sharded over the ranks, in engine order (base first)."""
        both = self.nudger is not None and self.nudger_placement == "tensor"
        return [self.base] + ([self.nudger] if both else [])


def collective_timeout_s() -> float:
    return float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))


def under_torchrun(tp_size: int) -> bool:
    """True when torchrun (env:// rendezvous) started this process as one of tp_size ranks."""
    if not all(k in os.environ for k in TORCHRUN_ENV):
        return False
    world = int(os.environ["WORLD_SIZE"])
    if world != tp_size:
        raise ValueError(f"torchrun started {world} processes but tensor_parallel_size is {tp_size}")
    return True


def rank_device(device: str, local_rank: int) -> torch.device:
    """cuda / cuda:K -> cuda:(K + local_rank): one GPU per rank; the CPU is shared."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.device("cuda", (dev.index or 0) + local_rank)
    return dev


def free_tcp_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


STORE_HOST = "127.0.0.1"     # spawned workers run on this machine
GROUP_PREFIX = "nudge-tp/"   # the backend's keys in the engine's store


def open_store(spec: LaunchSpec, rank: int, port: int = 0):
    """Rank 0 serves the engine's own TCPStore (port 0: a free one, read back from .port); workers join it."""
    return dist.TCPStore(STORE_HOST, port, spec.tp_size, rank == 0, timedelta(seconds=spec.timeout_s),
                         wait_for_workers=False)


def new_group(spec: LaunchSpec, rank: int, store, device: torch.device) -> TensorParallel:
    """The engine's own backend, built on its store (not registered as the process's default group)."""
    timeout = timedelta(seconds=spec.timeout_s)
    prefixed = dist.PrefixStore(GROUP_PREFIX, store)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        backend = dist.ProcessGroupNCCL(prefixed, rank, spec.tp_size, opts)
    else:
        backend = dist.ProcessGroupGloo(prefixed, rank, spec.tp_size, timeout)
    backend._set_sequence_number_for_group()   # as init_process_group does for its backends (via the store)
    return TensorParallel(rank, spec.tp_size, backend)


def init_default_group(spec: LaunchSpec, rank: int, device: torch.device) -> TensorParallel:
    """torchrun: the default group over env:// (one engine per process there)."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method="env://", world_size=spec.tp_size, rank=rank,
                            timeout=timedelta(seconds=spec.timeout_s))
    return TensorParallel(rank, spec.tp_size, dist.group.WORLD)


def abort_group(tp: TensorParallel) -> None:
    """Makes a collective blocked on a dead peer raise instead of hanging (NCCL waits for its watchdog)."""
    abort = getattr(tp.group, "abort", None)
    try:
        if abort is not None:
            abort()
    except Exception:  # noqa: BLE001  best effort: the group is broken either way
        pass


def destroy_group(tp: TensorParallel | None) -> None:
    """Leaves the group: the default one under torchrun, else shuts the engine's own backend down."""
    try:
        if tp is not None and tp.group is not None and tp.group is dist.group.WORLD:
            if dist.is_initialized():
                dist.destroy_process_group()
        elif tp is not None and hasattr(tp.group, "shutdown"):
            tp.group.shutdown()
    except Exception:  # noqa: BLE001  a peer gone mid-collective leaves nothing to tear down cleanly
        pass
