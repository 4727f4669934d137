"""Rotary position embedding (neox layout: rotate halves), with Llama-3 frequency scaling."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..model.config import RopeConfig


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_positions: int, rope: RopeConfig):
        super().__init__()
        if torch.empty(0).is_meta:
            # The loader's shape-only pass builds models on "meta": skip the arithmetic (on meta
            # tensors it goes through torch's reference ops, which import torch._dynamo and triton).
            cos = sin = torch.empty(max_positions, head_dim // 2)
        else:
            inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
            if rope.scaling is not None:
                inv_freq = _llama3_inv_freq(inv_freq, rope.scaling)
            angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
            cos, sin = angles.cos(), angles.sin()
        self.register_buffer("cos", cos, persistent=False)  # [max_positions, head_dim/2]
        self.register_buffer("sin", sin, persistent=False)  # [max_positions, head_dim/2]
        self._positions: torch.Tensor | None = None
        self._cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(
        self,
        positions: torch.Tensor,  # [num_tokens] int64
        q: torch.Tensor,          # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,          # [num_tokens, num_kv_heads, head_dim]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Every layer of a step rotates the same positions: gather cos/sin once per step.
        if positions is not self._positions:
            self._positions = positions
            self._cos_sin = (self.cos[positions][:, None, :], self.sin[positions][:, None, :])  # [num_tokens, 1, head_dim/2]
        cos, sin = self._cos_sin
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
