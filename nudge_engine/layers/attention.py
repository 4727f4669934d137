"""Self-attention block: fused qkv projection, optional QK-norm / clipping, rotary, paged attention.

Tensor parallel (layers/parallel.py): each rank holds its share of the query heads and of the KV heads
(one KV head, replicated, when there are fewer KV heads than ranks); o_proj is row-parallel.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from .attention_torch import NO_SOFTCAP, NO_WINDOW
from .forward_context import ForwardContext
from .linear import FusedLinear, Linear, RowParallelLinear
from .norm import RMSNorm
from .parallel import TensorParallel, current, set_checkpoint_slice
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
        self.tp = tp = current()
        self.layer_index = layer_index
        if tp.size == 1:
            self.spec = spec
            q_size, kv_size = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
            self.qkv_proj = FusedLinear(hidden, {"q": q_size, "k": kv_size, "v": kv_size}, bias=spec.bias)
            self.o_proj = Linear(q_size, hidden)
        else:
            self.spec, q_start, kv_start = _shard_spec(spec, tp)
            d, s = spec.head_dim, self.spec
            q_size, kv_size = s.num_heads * d, s.num_kv_heads * d
            full_kv = spec.num_kv_heads * d
            slices = {"q": (q_start * d, spec.num_heads * d), "k": (kv_start * d, full_kv), "v": (kv_start * d, full_kv)}
            self.qkv_proj = FusedLinear(hidden, {"q": q_size, "k": kv_size, "v": kv_size}, spec.bias, slices)
            self.o_proj = RowParallelLinear(spec.num_heads * d, hidden, tp)
        if spec.qk_norm_eps is not None:
            self.q_norm = RMSNorm(q_size, spec.qk_norm_eps)
            self.k_norm = RMSNorm(kv_size, spec.qk_norm_eps)
            if tp.size > 1:
                if spec.num_kv_heads < tp.size:
                    raise ValueError(f"QK-norm over the whole k projection needs the KV heads ({spec.num_kv_heads}) "
                                     f"split over the ranks, not replicated: use at most {spec.num_kv_heads} ranks")
                set_checkpoint_slice(self.q_norm.weight, None, 0, q_start * d, q_size, spec.num_heads * d)
                set_checkpoint_slice(self.k_norm.weight, None, 0, kv_start * d, kv_size, spec.num_kv_heads * d)
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
        qkv = self.qkv_proj(x)                        # [num_tokens, (heads + 2 * kv_heads) * head_dim]
        if s.qk_norm_eps is not None and self.tp.size > 1:
            # The norm is over the whole projection, which no rank holds: sum the squares over the ranks.
            q, k, v = self.qkv_proj.split(qkv)
            qkv = torch.cat([_sharded_rms_norm(q, self.q_norm, self.tp), _sharded_rms_norm(k, self.k_norm, self.tp), v], -1)
            qk_norms = (None, None)
        # One step from the QKV GEMM to attention: clip, QK-norm, rotary, K/V into the cache.
        q = ctx.backend.rotary_store(qkv, positions, s, self.rotary, *qk_norms, k_cache, v_cache, ctx.meta)
        out = ctx.backend.attend(q, k_cache, v_cache, ctx.meta, s.scale, s.sliding_window, s.softcap)
        return self.o_proj(out.reshape(x.shape[0], s.num_heads * s.head_dim))


def _shard_spec(spec: AttentionSpec, tp: TensorParallel) -> tuple[AttentionSpec, int, int]:
    """-> (this rank's spec, its first query head, its first KV head). With fewer KV heads than ranks
    each rank keeps the one KV head its query heads read (grouped-query attention)."""
    q_start, q_heads = tp.split(spec.num_heads, "the attention heads")
    if spec.num_kv_heads >= tp.size:
        kv_start, kv_heads = tp.split(spec.num_kv_heads, "the KV heads")
    else:
        if tp.size % spec.num_kv_heads:
            raise ValueError(f"tensor parallel size {tp.size} is not a multiple of the KV heads ({spec.num_kv_heads})")
        kv_start, kv_heads = tp.rank * spec.num_kv_heads // tp.size, 1
    return replace(spec, num_heads=q_heads, num_kv_heads=kv_heads), q_start, kv_start


def _sharded_rms_norm(x: torch.Tensor, norm: RMSNorm, tp: TensorParallel) -> torch.Tensor:
    """RMSNorm over a projection split across the ranks (x: [num_tokens, dim / tp]), as norm.py computes it."""
    xf = x.float()
    squares = xf.pow(2).sum(-1, keepdim=True)   # [num_tokens, 1]
    tp.all_reduce(squares)
    normed = xf * torch.rsqrt(squares / (x.shape[-1] * tp.size) + norm.eps)
    return norm.weight * normed.to(x.dtype)
