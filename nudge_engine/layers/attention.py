"""Self-attention block: fused qkv projection, optional QK-norm / clipping, rotary, paged attention."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .attention_torch import NO_SOFTCAP, NO_WINDOW
from .forward_context import ForwardContext
from .linear import FusedLinear, Linear
from .norm import RMSNorm
from .rotary import RotaryEmbedding


@dataclass(frozen=True)
class AttentionSpec:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    bias: bool = False
    qk_norm_eps: float | None = None    # OLMo-2: RMSNorm over the whole q and k projections
    clip_qkv: float | None = None       # OLMo-1: clamp q, k, v
    softcap: float = NO_SOFTCAP         # Gemma-2 attention logit softcapping
    sliding_window: int = NO_WINDOW


class Attention(nn.Module):
    def __init__(self, hidden: int, spec: AttentionSpec, rotary: RotaryEmbedding, layer_index: int):
        super().__init__()
        self.spec = spec
        self.layer_index = layer_index
        q_size, kv_size = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        self.qkv_proj = FusedLinear(hidden, {"q": q_size, "k": kv_size, "v": kv_size}, bias=spec.bias)
        self.o_proj = Linear(q_size, hidden)
        if spec.qk_norm_eps is not None:
            self.q_norm = RMSNorm(q_size, spec.qk_norm_eps)
            self.k_norm = RMSNorm(kv_size, spec.qk_norm_eps)
        self.rotary = rotary

    def forward(
        self,
        positions: torch.Tensor,  # [num_tokens]
        x: torch.Tensor,          # [num_tokens, hidden]
        ctx: ForwardContext,
    ) -> torch.Tensor:            # [num_tokens, hidden]
        s = self.spec
        k_cache, v_cache = ctx.kv_cache[self.layer_index]
        qk_norms = (self.q_norm, self.k_norm) if s.qk_norm_eps is not None else (None, None)
        # One step from the QKV GEMM to attention: clip, QK-norm, rotary, K/V into the cache.
        q = ctx.backend.rotary_store(self.qkv_proj(x), positions, s, self.rotary, *qk_norms,
                                     k_cache, v_cache, ctx.meta)
        out = ctx.backend.attend(q, k_cache, v_cache, ctx.meta, s.scale, s.sliding_window, s.softcap)
        return self.o_proj(out.reshape(x.shape[0], s.num_heads * s.head_dim))
