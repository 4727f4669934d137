"""Write the new tokens' K and V into the paged cache (same semantics as store_kv_torch)."""
from __future__ import annotations

import torch

from . import utils  # noqa: F401  (sets up the interpreter on GPU-less machines before triton)
from .utils import next_pow2

import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(
    key_ptr,           # [num_tokens, num_kv_heads, head_dim]
    value_ptr,         # [num_tokens, num_kv_heads, head_dim]
    k_cache_ptr,       # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,       # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping_ptr,  # [num_tokens] int, < 0 = skip
    num_kv_heads,
    head_dim,
    block_size,
    stride_kt, stride_kh,                      # key strides (head_dim stride is 1)
    stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch,        # k_cache strides (block, slot-in-block, head)
    stride_vcb, stride_vcs, stride_vch,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    # NO_SLOT marks tokens whose K/V must not be stored; like store_kv_torch, any negative
    # slot is skipped, not only NO_SLOT itself.
    if slot < 0:
        return
    blk = slot // block_size
    off = slot % block_size

    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < num_kv_heads) & (d < head_dim)
    token64 = token.to(tl.int64)

    k = tl.load(key_ptr + token64 * stride_kt + h * stride_kh + d, mask=mask)
    v = tl.load(value_ptr + token64 * stride_vt + h * stride_vh + d, mask=mask)
    k_dst = k_cache_ptr + blk * stride_kcb + off * stride_kcs + h * stride_kch + d
    v_dst = v_cache_ptr + blk * stride_vcb + off * stride_vcs + h * stride_vch + d
    tl.store(k_dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv(
    key: torch.Tensor,           # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,         # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,       # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,       # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int, < 0 = skip
) -> None:
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    # key/value are often strided views of a fused QKV projection: only head_dim must be dense.
    if key.stride(2) != 1:
        key = key.contiguous()
    if value.stride(2) != 1:
        value = value.contiguous()
    assert k_cache.stride(3) == 1 and v_cache.stride(3) == 1, "cache head_dim must be contiguous"
    block_size = k_cache.shape[1]
    _store_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        num_kv_heads, head_dim, block_size,
        key.stride(0), key.stride(1),
        value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        BLOCK_H=next_pow2(num_kv_heads),
        BLOCK_D=next_pow2(head_dim),
        num_warps=4 if num_kv_heads * head_dim >= 1024 else 1,
    )
