"""Which tensor-parallel shard a model being built is (rank, size, process group), and its collectives.

Layers read `current()` while they are constructed (nudge_engine/distributed/ sets it around a
model's build with `building(tp)`), so a family file stays the same for one process or N. With the
default SINGLE every collective is the identity and every layer is built whole.
The collectives are torch.distributed's own, called on the group object itself (its allreduce,
allgather, broadcast): an engine's group is built from its own store rather than registered as the
process's default group (distributed/group.py), so torch.distributed's module functions, which look a
group up in the process-wide registry, cannot take it. Nothing here is hand-written communication.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TensorParallel:
    rank: int
    size: int
    group: Any = None   # torch.distributed ProcessGroup or Backend (ProcessGroupGloo/NCCL); None with size 1

    def split(self, total: int, what: str) -> tuple[int, int]:
        """(start, length) of this rank's even share of `total` rows; ValueError unless it divides."""
        if total % self.size:
            raise ValueError(f"tensor parallel size {self.size} does not divide {what} ({total})")
        length = total // self.size
        return self.rank * length, length

    def all_reduce(self, x: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:  # in place over the ranks
        if self.size > 1:
            opts = dist.AllreduceOptions()
            opts.reduceOp = op
            self.group.allreduce([x], opts).wait()
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:  # [n, d] -> [n, size * d], rank order
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        self.group.allgather([parts], [x.contiguous()]).wait()
        return torch.cat(parts, dim=-1)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:  # in place, from rank src
        if self.size > 1:
            opts = dist.BroadcastOptions()
            opts.rootRank, opts.rootTensor = src, 0
            self.group.broadcast([x], opts).wait()
        return x


SINGLE = TensorParallel(0, 1)
_current = SINGLE


def current() -> TensorParallel:
    return _current


@contextmanager
def building(tp: TensorParallel) -> Iterator[None]:
    """Models constructed inside are `tp`'s shard."""
    global _current
    previous, _current = _current, tp
    try:
        yield
    finally:
        _current = previous


def set_checkpoint_slice(param: torch.nn.Parameter, shard: str | None, dim: int, start: int, length: int,
                         full: int) -> None:
    """The loader narrows the checkpoint tensor of (param, shard) to [start, start + length) along dim,
    and checks that dimension is `full` in the file."""
    slices = getattr(param, "checkpoint_slices", None)
    if slices is None:
        slices = param.checkpoint_slices = {}
    slices[shard] = (dim, start, length, full)
