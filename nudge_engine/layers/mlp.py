from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from .linear import FusedLinear, Linear

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
        self.gate_up_proj = FusedLinear(hidden, {"gate": intermediate, "up": intermediate})
        self.down_proj = Linear(intermediate, hidden)
        self.act = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [num_tokens, hidden]
        gate, up = self.gate_up_proj.split(self.gate_up_proj(x))
        return self.down_proj(self.act(gate) * up)
