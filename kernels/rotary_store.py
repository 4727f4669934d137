"""From the QKV GEMM output to attention's inputs in one launch (same semantics as
rotary_store_torch): clip q/k/v (OLMo-1), RMS-normalize the whole q and k projections (OLMo-2's
QK-norm), rotate q and k, write the rotated queries out and K, V into the paged cache.

One program per token holds all its heads, so the QK-norm's reduction over the whole projection
needs no second pass. Rotary is the neox "rotate halves" form that all supported families use;
the families differ only in the cos / sin tables (theta, Llama-3 frequency scaling), which are
precomputed once per model (RotaryEmbedding) and read here at each token's position, so a step
gathers nothing beforehand.
"""
from __future__ import annotations

import torch
from torch import nn

from . import utils  # noqa: F401  (sets up the interpreter on GPU-less machines before triton)
from .utils import next_pow2

import triton
import triton.language as tl

from nudge_engine.layers.norm import RMSNorm


@triton.jit
def _load_halves(row, head_dim, half, num_heads, CLIP: tl.constexpr, clip, BLOCK_H: tl.constexpr,
                 BLOCK_HALF: tl.constexpr):
    """The two halves of every head of one projection: ([BLOCK_H, BLOCK_HALF] float32 x 2, mask)."""
    h = tl.arange(0, BLOCK_H)[:, None]
    j = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (h < num_heads) & (j < half)
    src = row + h * head_dim + j
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + half, mask=mask, other=0.0).to(tl.float32)
    if CLIP:
        x1 = tl.minimum(tl.maximum(x1, -clip), clip)
        x2 = tl.minimum(tl.maximum(x2, -clip), clip)
    return x1, x2, mask, h * head_dim + j


@triton.jit
def _qk_norm(x1, x2, mask, offs, w_ptr, half, n, eps, DTYPE: tl.constexpr):
    """RMSNorm over the whole projection (n = heads * head_dim), Llama rounding (as RMSNorm)."""
    inv = tl.rsqrt((tl.sum(tl.sum(x1 * x1, axis=1), axis=0) + tl.sum(tl.sum(x2 * x2, axis=1), axis=0)) / n + eps)
    w1 = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w2 = tl.load(w_ptr + offs + half, mask=mask, other=0.0).to(tl.float32)
    x1 = ((x1 * inv).to(DTYPE).to(tl.float32) * w1).to(DTYPE).to(tl.float32)
    x2 = ((x2 * inv).to(DTYPE).to(tl.float32) * w2).to(DTYPE).to(tl.float32)
    return x1, x2


@triton.jit
def _rotary_store_kernel(
    qkv_ptr,           # [num_tokens, (num_heads + 2 * num_kv_heads) * head_dim]: q | k | v
    positions_ptr,     # [num_tokens] int
    cos_ptr, sin_ptr,  # [max_positions, head_dim // 2] float32
    q_norm_w_ptr,      # [num_heads * head_dim] (QK_NORM only)
    k_norm_w_ptr,      # [num_kv_heads * head_dim]
    q_out_ptr,         # [num_tokens, num_heads, head_dim]
    k_cache_ptr,       # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,
    slot_mapping_ptr,  # [num_tokens] int, < 0 = do not store
    num_heads, num_kv_heads, head_dim, block_size,
    stride_qkv, stride_cos, stride_qt, stride_qh,
    stride_kcb, stride_kcs, stride_kch,
    stride_vcb, stride_vcs, stride_vch,
    clip, eps,
    CLIP: tl.constexpr,
    QK_NORM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_KH: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    dtype = q_out_ptr.dtype.element_ty
    half = head_dim // 2
    pos = tl.load(positions_ptr + token).to(tl.int64)
    j = tl.arange(0, BLOCK_HALF)[None, :]
    cos = tl.load(cos_ptr + pos * stride_cos + j, mask=j < half, other=0.0)
    sin = tl.load(sin_ptr + pos * stride_cos + j, mask=j < half, other=0.0)
    row = qkv_ptr + token * stride_qkv
    k_row = row + num_heads * head_dim
    v_row = k_row + num_kv_heads * head_dim

    # Queries: rotated into q_out.
    q1, q2, q_mask, q_offs = _load_halves(row, head_dim, half, num_heads, CLIP, clip, BLOCK_H, BLOCK_HALF)
    if QK_NORM:
        q1, q2 = _qk_norm(q1, q2, q_mask, q_offs, q_norm_w_ptr, half, num_heads * head_dim, eps, dtype)
    elif CLIP:
        q1, q2 = q1.to(dtype).to(tl.float32), q2.to(dtype).to(tl.float32)
    h = tl.arange(0, BLOCK_H)[:, None]
    q_dst = q_out_ptr + token * stride_qt + h * stride_qh + j
    tl.store(q_dst, (q1 * cos - q2 * sin).to(dtype), mask=q_mask)
    tl.store(q_dst + half, (q2 * cos + q1 * sin).to(dtype), mask=q_mask)

    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    # Any negative slot (NO_SLOT) is skipped, as in store_kv_torch; the queries are still written.
    if slot >= 0:
        blk = slot // block_size
        off = slot % block_size
        k1, k2, k_mask, k_offs = _load_halves(k_row, head_dim, half, num_kv_heads, CLIP, clip, BLOCK_KH,
                                              BLOCK_HALF)
        if QK_NORM:
            k1, k2 = _qk_norm(k1, k2, k_mask, k_offs, k_norm_w_ptr, half, num_kv_heads * head_dim, eps, dtype)
        elif CLIP:
            k1, k2 = k1.to(dtype).to(tl.float32), k2.to(dtype).to(tl.float32)
        kh = tl.arange(0, BLOCK_KH)[:, None]
        cache_dtype = k_cache_ptr.dtype.element_ty
        k_dst = k_cache_ptr + blk * stride_kcb + off * stride_kcs + kh * stride_kch + j
        # Round to the model dtype first (as the torch path does), then to the cache's.
        tl.store(k_dst, (k1 * cos - k2 * sin).to(dtype).to(cache_dtype), mask=k_mask)
        tl.store(k_dst + half, (k2 * cos + k1 * sin).to(dtype).to(cache_dtype), mask=k_mask)
        v1, v2, v_mask, _ = _load_halves(v_row, head_dim, half, num_kv_heads, CLIP, clip, BLOCK_KH, BLOCK_HALF)
        v_dst = v_cache_ptr + blk * stride_vcb + off * stride_vcs + kh * stride_vch + j
        tl.store(v_dst, v1.to(dtype).to(v_cache_ptr.dtype.element_ty), mask=v_mask)
        tl.store(v_dst + half, v2.to(dtype).to(v_cache_ptr.dtype.element_ty), mask=v_mask)


def rotary_store(
    qkv: torch.Tensor,           # [num_tokens, (num_heads + 2 * num_kv_heads) * head_dim]: q | k | v
    positions: torch.Tensor,     # [num_tokens] int
    spec,                        # AttentionSpec: head counts, head_dim, clip_qkv
    rotary: nn.Module,           # RotaryEmbedding: cos / sin [max_positions, head_dim // 2] float32
    q_norm: RMSNorm | None,      # OLMo-2 QK-norm, or None
    k_norm: RMSNorm | None,
    k_cache: torch.Tensor,       # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,       # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int, < 0 = skip
) -> torch.Tensor:               # [num_tokens, num_heads, head_dim] rotated queries
    num_tokens = qkv.shape[0]
    heads, kv_heads, head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
    assert qkv.shape[1] == (heads + 2 * kv_heads) * head_dim, "qkv width does not match the heads"
    assert head_dim % 2 == 0, "rotary needs an even head_dim"
    assert k_cache.stride(3) == 1 and v_cache.stride(3) == 1, "cache head_dim must be contiguous"
    if qkv.stride(1) != 1:
        qkv = qkv.contiguous()
    cos, sin = rotary.cos, rotary.sin
    assert cos.stride(1) == 1 and sin.stride() == cos.stride()
    qk_norm = q_norm is not None
    if qk_norm:
        assert not q_norm.unit_offset and not k_norm.unit_offset and q_norm.eps == k_norm.eps
    q_out = torch.empty(num_tokens, heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if num_tokens == 0:
        return q_out
    _rotary_store_kernel[(num_tokens,)](
        qkv, positions, cos, sin,
        q_norm.weight if qk_norm else qkv, k_norm.weight if qk_norm else qkv,
        q_out, k_cache, v_cache, slot_mapping,
        heads, kv_heads, head_dim, k_cache.shape[1],
        qkv.stride(0), cos.stride(0), q_out.stride(0), q_out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        float(spec.clip_qkv) if spec.clip_qkv is not None else 0.0,
        float(q_norm.eps) if qk_norm else 0.0,
        CLIP=spec.clip_qkv is not None, QK_NORM=qk_norm,
        BLOCK_H=next_pow2(heads), BLOCK_KH=next_pow2(kv_heads), BLOCK_HALF=next_pow2(head_dim // 2),
        num_warps=4 if heads * head_dim >= 1024 else 1,
    )
    return q_out
