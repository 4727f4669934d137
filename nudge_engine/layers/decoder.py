"""One transformer block for every family. Families differ only in where their norms sit.

`norm_roles` maps the checkpoint's norm names (they become this module's attribute names, so
tensors load by name) to a place in the block: pre_attn, post_attn, pre_mlp, post_mlp.
    Llama / Qwen2 / OLMo: input_layernorm -> pre_attn, post_attention_layernorm -> pre_mlp
    Gemma-2: all four (sandwich)
    OLMo-2:  post_attention_layernorm -> post_attn, post_feedforward_layernorm -> post_mlp
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .attention import Attention
from .forward_context import ForwardContext
from .mlp import GatedMLP

ROLES = ("pre_attn", "post_attn", "pre_mlp", "post_mlp")


class DecoderLayer(nn.Module):
    def __init__(
        self,
        self_attn: Attention,
        mlp: GatedMLP,
        norm_roles: dict[str, str],
        make_norm: Callable[[], nn.Module],
    ):
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self._norm_by_role: dict[str, str] = {}
        for name, role in norm_roles.items():
            if role not in ROLES:
                raise ValueError(f"unknown norm role {role!r}")
            setattr(self, name, make_norm())
            self._norm_by_role[role] = name

    def _norm(self, role: str, x: torch.Tensor) -> torch.Tensor:
        name = self._norm_by_role.get(role)
        return x if name is None else getattr(self, name)(x)

    def forward(
        self,
        positions: torch.Tensor,  # [num_tokens]
        x: torch.Tensor,          # [num_tokens, hidden]
        ctx: ForwardContext,
    ) -> torch.Tensor:            # [num_tokens, hidden]
        h = self._norm("post_attn", self.self_attn(positions, self._norm("pre_attn", x), ctx))
        x = x + h
        h = self._norm("post_mlp", self.mlp(self._norm("pre_mlp", x)))
        return x + h
