"""Residual add fused with the norms on either side of it (same semantics as add_norm_torch).

    residual' = residual + post(x);  out = pre(residual')

One program per row, the row held in registers: x and residual are read once, residual' and out
written once. Covers every family's step between two sublayers:
    Llama / Qwen2 (pre-norm)      post = none,        pre = RMSNorm
    OLMo-1                        post = none,        pre = non-parametric LayerNorm
    OLMo-2 (post-norm)            post = RMSNorm,     pre = none (out is residual')
    Gemma-2 (sandwich)            post = RMSNorm(1+w), pre = RMSNorm(1+w)
With `rows` it is the final norm fused with the gather of the logits rows: program i reads row
rows[i] and writes row i, so the other rows are never normalized.

Rounding follows the torch modules: the add rounds to the model dtype; RMSNorm rounds the
normalized value to the dtype before the weight multiply (Llama), Gemma's (1 + w) multiplies in
float32 and rounds once.
"""
from __future__ import annotations

import torch
from torch import nn

from . import utils  # noqa: F401  (sets up the interpreter on GPU-less machines before triton)
from .utils import next_pow2

import triton
import triton.language as tl

from nudge_engine.layers.norm import NonParametricLayerNorm, RMSNorm

NORM_NONE = 0
NORM_RMS = 1              # weight * rms_norm(x)        (Llama, Qwen2, OLMo-2)
NORM_RMS_UNIT_OFFSET = 2  # (1 + weight) * rms_norm(x)  (Gemma-2)
NORM_LAYER = 3            # layer norm, no weight, no bias (OLMo-1)
_NORM_NONE = tl.constexpr(NORM_NONE)
_NORM_RMS_UNIT_OFFSET = tl.constexpr(NORM_RMS_UNIT_OFFSET)
_NORM_LAYER = tl.constexpr(NORM_LAYER)


@triton.jit
def _norm(x, mask, w_ptr, offs, eps, n, KIND: tl.constexpr, DTYPE: tl.constexpr):
    """x: [BLOCK] float32 (zero where masked) -> normalized, rounded to DTYPE, as float32."""
    if KIND == _NORM_LAYER:
        mean = tl.sum(x, axis=0) / n
        xc = tl.where(mask, x - mean, 0.0)
        y = xc * tl.rsqrt(tl.sum(xc * xc, axis=0) / n + eps)
    else:
        y = x * tl.rsqrt(tl.sum(x * x, axis=0) / n + eps)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if KIND == _NORM_RMS_UNIT_OFFSET:
            y = y * (1.0 + w)
        else:
            y = y.to(DTYPE).to(tl.float32) * w
    return y.to(DTYPE).to(tl.float32)


@triton.jit
def _add_norm_kernel(
    x_ptr,          # [num_tokens, hidden]
    res_ptr,        # [num_tokens, hidden] (unused without HAS_RESIDUAL)
    rows_ptr,       # [num_rows] int (unused without HAS_ROWS)
    post_w_ptr,     # [hidden]
    pre_w_ptr,      # [hidden]
    out_ptr,        # [num_rows, hidden] pre(residual') (unused when PRE is none)
    res_out_ptr,    # [num_rows, hidden] residual'
    hidden,
    stride_x, stride_r, stride_o, stride_ro,
    post_eps, pre_eps,
    POST: tl.constexpr,
    PRE: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    if HAS_ROWS:
        row = tl.load(rows_ptr + pid).to(tl.int64)
    else:
        row = pid.to(tl.int64)
    pid64 = pid.to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    dtype = res_out_ptr.dtype.element_ty

    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if POST != _NORM_NONE:
        x = _norm(x, mask, post_w_ptr, offs, post_eps, hidden, POST, dtype)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
        x = (r + x).to(dtype).to(tl.float32)
    tl.store(res_out_ptr + pid64 * stride_ro + offs, x.to(dtype), mask=mask)
    if PRE != _NORM_NONE:
        y = _norm(x, mask, pre_w_ptr, offs, pre_eps, hidden, PRE, dtype)
        tl.store(out_ptr + pid64 * stride_o + offs, y.to(dtype), mask=mask)


def norm_kind(norm: nn.Module | None) -> tuple[int, torch.Tensor | None, float]:
    """(NORM_* kind, weight or None, eps) of one of the model's norm modules."""
    if norm is None:
        return NORM_NONE, None, 0.0
    if isinstance(norm, RMSNorm):
        return (NORM_RMS_UNIT_OFFSET if norm.unit_offset else NORM_RMS), norm.weight, float(norm.eps)
    if isinstance(norm, NonParametricLayerNorm):
        return NORM_LAYER, None, float(norm.eps)
    raise TypeError(f"add_norm: no fused form of {type(norm).__name__}")


def _num_warps(block: int) -> int:
    # Enough threads that each holds a few elements of the row (Liger-Kernel's rule of thumb).
    return 16 if block >= 8192 else 8 if block >= 2048 else 4 if block >= 512 else 1


def add_norm(
    x: torch.Tensor,                 # [num_tokens, hidden]
    residual: torch.Tensor | None,   # [num_tokens, hidden]; None: x is the residual stream
    post: nn.Module | None,          # norm of x before the add
    pre: nn.Module | None,           # norm of the new residual
    rows: torch.Tensor | None = None,  # [num_rows] int64: compute only these rows, in this order
) -> tuple[torch.Tensor, torch.Tensor]:  # (pre(residual'), residual'), each [num_rows, hidden]
    post_kind, post_w, post_eps = norm_kind(post)
    pre_kind, pre_w, pre_eps = norm_kind(pre)
    if rows is None and residual is None and post_kind == NORM_NONE and pre_kind == NORM_NONE:
        return x, x  # nothing to compute (OLMo-2's first layer)
    num_tokens, hidden = x.shape
    num_rows = num_tokens if rows is None else rows.shape[0]
    if x.stride(1) != 1:
        x = x.contiguous()
    if residual is not None and residual.stride(1) != 1:
        residual = residual.contiguous()
    res_out = torch.empty(num_rows, hidden, dtype=x.dtype, device=x.device)
    out = torch.empty_like(res_out) if pre_kind != NORM_NONE else res_out
    if num_rows == 0:
        return out, res_out
    res_in = residual if residual is not None else x
    block = next_pow2(hidden)
    _add_norm_kernel[(num_rows,)](
        x, res_in, rows if rows is not None else x,
        post_w if post_w is not None else x, pre_w if pre_w is not None else x,
        out, res_out, hidden,
        x.stride(0), res_in.stride(0), out.stride(0), res_out.stride(0),
        post_eps, pre_eps,
        POST=post_kind, PRE=pre_kind, HAS_RESIDUAL=residual is not None, HAS_ROWS=rows is not None,
        BLOCK=block, num_warps=_num_warps(block),
    )
    return out, res_out
