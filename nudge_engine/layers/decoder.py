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

    def norm(self, role: str) -> nn.Module | None:
        name = self._norm_by_role.get(role)
        return None if name is None else getattr(self, name)

    def forward(
        self,
        positions: torch.Tensor,       # [num_tokens]
        x: torch.Tensor,               # [num_tokens, hidden] previous sublayer's output, not yet added
        residual: torch.Tensor | None,  # [num_tokens, hidden] residual stream; None at the first layer
        pending_post: nn.Module | None,  # previous layer's post_mlp norm, still to apply to x
        ctx: ForwardContext,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # (MLP output not yet post-normed and added, residual)
        # The residual add sits between two norms (the previous sublayer's post-norm and the next
        # one's pre-norm), so each add is one backend step with both norms: the MLP's add is done
        # by the next layer (or the final norm).
        h, residual = ctx.backend.add_norm(x, residual, pending_post, self.norm("pre_attn"))
        h = self.self_attn(positions, h, ctx)
        h, residual = ctx.backend.add_norm(h, residual, self.norm("post_attn"), self.norm("pre_mlp"))
        return self.mlp(h, ctx), residual
