"""Process group set-up: which rank this is, its device, and the torch.distributed group (no own comms)."""
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


def init_group(spec: LaunchSpec, rank: int, init_method: str, device: torch.device) -> TensorParallel:
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=init_method, world_size=spec.tp_size, rank=rank,
                            timeout=timedelta(seconds=spec.timeout_s))
    return TensorParallel(rank, spec.tp_size, dist.group.WORLD)


def destroy_group() -> None:
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001  a peer gone mid-collective leaves nothing to tear down cleanly
            pass
