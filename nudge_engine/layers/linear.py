"""Linear layers whose parameters carry their own weight loaders (nano-vllm style).

A fused projection (q|k|v, gate|up) is one GEMM; the checkpoint's separate tensors are copied
into their row ranges by `weight_loader(param, tensor, shard)`.
Tensor parallel (layers/parallel.py): a FusedLinear built with `tp_slices` is column-parallel (each
shard's rows are this rank's slice of the checkpoint's); RowParallelLinear splits the input features
and sums the ranks' partial outputs with one all-reduce, before any residual add.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn
import torch.nn.functional as F

from .parallel import SINGLE, TensorParallel, set_checkpoint_slice

WeightLoader = Callable[[nn.Parameter, torch.Tensor, "str | None"], None]


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard: str | None = None) -> None:
    param.data.copy_(loaded)


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))  # [out, in]
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None  # [out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [num_tokens, in] -> [num_tokens, out]
        return F.linear(x, self.weight, self.bias)


class FusedLinear(Linear):
    """Several projections of one input stacked along the output: shards named e.g. ("q", "k", "v")."""

    def __init__(self, in_features: int, shard_sizes: dict[str, int], bias: bool = False,
                 tp_slices: dict[str, tuple[int, int]] | None = None):
        """tp_slices: shard -> (start row in the checkpoint tensor, its full rows); shard_sizes are then
        this rank's rows of each."""
        super().__init__(in_features, sum(shard_sizes.values()), bias)
        self.shard_sizes = dict(shard_sizes)
        offsets, start = {}, 0
        for name, size in shard_sizes.items():
            offsets[name] = (start, size)
            start += size
        self.shard_offsets = offsets
        for p in self.parameters():
            p.weight_loader = self._load_shard
            p.expected_shards = tuple(shard_sizes)
            for name, (start, full) in (tp_slices or {}).items():
                set_checkpoint_slice(p, name, 0, start, shard_sizes[name], full)

    def _load_shard(self, param: nn.Parameter, loaded: torch.Tensor, shard: str | None) -> None:
        start, size = self.shard_offsets[shard]
        target = param.data.narrow(0, start, size)
        if target.shape != loaded.shape:
            raise ValueError(f"expected shape {tuple(target.shape)}, got {tuple(loaded.shape)}")
        target.copy_(loaded)

    def split(self, out: torch.Tensor) -> Sequence[torch.Tensor]:  # out: [num_tokens, sum(shards)]
        return out.split(list(self.shard_sizes.values()), dim=-1)


class RowParallelLinear(Linear):
    """Input features split over the ranks: out = all_reduce(x_local @ W_local^T) (+ bias once)."""

    def __init__(self, in_features: int, out_features: int, tp: TensorParallel = SINGLE, bias: bool = False):
        start, length = tp.split(in_features, "the input features of a row-parallel layer")
        super().__init__(length, out_features, bias)
        self.tp = tp
        set_checkpoint_slice(self.weight, None, 1, start, length, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [num_tokens, in / tp] -> [num_tokens, out]
        out = self.tp.all_reduce(F.linear(x, self.weight))
        return out if self.bias is None else out + self.bias
