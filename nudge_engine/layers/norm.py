"""Normalizations of the supported families. All compute in float32 and cast back, as transformers does."""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    """weight * x / rms(x). With `unit_offset` (Gemma) the stored weight is w and the scale is 1 + w."""

    def __init__(self, dim: int, eps: float, unit_offset: bool = False):
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.empty(dim))  # [dim]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [num_tokens, dim]
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        if self.unit_offset:
            return (normed * (1.0 + self.weight.float())).to(x.dtype)
        # Llama casts before the weight multiply; Gemma after (transformers PR 29402).
        return self.weight * normed.to(x.dtype)


class NonParametricLayerNorm(nn.Module):
    """OLMo-1: layer norm with no learnable weight or bias."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.dim = dim
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [num_tokens, dim]
        return F.layer_norm(x.float(), (self.dim,), None, None, eps=self.eps).to(x.dtype)


def add_norm_torch(
    x: torch.Tensor,                 # [num_tokens, hidden] a sublayer's output (or the embeddings)
    residual: torch.Tensor | None,   # [num_tokens, hidden] the residual stream; None before the first layer
    post: nn.Module | None,          # norm applied to x before the add (OLMo-2, Gemma-2)
    pre: nn.Module | None,           # norm of the new residual, the next sublayer's input
    rows: torch.Tensor | None = None,  # [num_rows] int64: keep only these rows (the logits rows)
) -> tuple[torch.Tensor, torch.Tensor]:  # (next sublayer input, new residual), [num_rows or num_tokens, hidden]
    """residual' = residual + post(x); out = pre(residual'). The step between two sublayers, and
    (with rows) the final norm of the logits rows. The torch backend runs this; kernels/add_norm.py
    is its fused form."""
    if rows is not None:
        x = x[rows]
        residual = residual[rows] if residual is not None else None
    if post is not None:
        x = post(x)
    residual = x if residual is None else residual + x
    return (pre(residual) if pre is not None else residual), residual
