from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from .forward_context import ForwardContext
from .linear import FusedLinear, Linear, RowParallelLinear
from .parallel import current

ACTIVATIONS = {
    "silu": F.silu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)), with gate and up in one GEMM."""

    def __init__(self, hidden: int, intermediate: int, activation: str):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"config.json: activation {activation!r} is not supported ({sorted(ACTIVATIONS)})")
        tp = current()
        if tp.size == 1:
            self.gate_up_proj = FusedLinear(hidden, {"gate": intermediate, "up": intermediate})
            self.down_proj = Linear(intermediate, hidden)
        else:   # column-parallel gate|up, row-parallel down: one all-reduce after the MLP
            start, local = tp.split(intermediate, "the MLP's intermediate size")
            slices = {"gate": (start, intermediate), "up": (start, intermediate)}
            self.gate_up_proj = FusedLinear(hidden, {"gate": local, "up": local}, tp_slices=slices)
            self.down_proj = RowParallelLinear(intermediate, hidden, tp)
        self.activation = activation

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:  # x: [num_tokens, hidden]
        return self.down_proj(ctx.backend.act_and_mul(self.gate_up_proj(x), self.activation))


def act_and_mul_torch(
    gate_up: torch.Tensor,  # [num_tokens, 2 * intermediate]: gate | up
    activation: str,        # a key of ACTIVATIONS
) -> torch.Tensor:          # [num_tokens, intermediate]
    """act(gate) * up: the torch backend's (and kernels/act_and_mul.py's reference)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return ACTIVATIONS[activation](gate) * up
