"""Gated activation: act(gate) * up in one pass over the fused gate|up GEMM output (same
semantics as act_and_mul_torch). SiLU (Llama, Qwen2, OLMo) and GELU-tanh (Gemma-2).

Grid: (token, tile of the intermediate dimension). Rounding follows torch: the activation rounds
to the model dtype before the multiply.
"""
from __future__ import annotations

import torch

from . import utils  # noqa: F401  (sets up the interpreter on GPU-less machines before triton)
from .utils import next_pow2

import triton
import triton.language as tl

ACT_SILU = 0
ACT_GELU_TANH = 1
ACTIVATION_CODES = {"silu": ACT_SILU, "gelu_pytorch_tanh": ACT_GELU_TANH, "gelu_tanh": ACT_GELU_TANH}
_ACT_SILU = tl.constexpr(ACT_SILU)
_MAX_BLOCK = 1024


@triton.jit
def _tanh(x):
    # From exp(-2|x|) <= 1: never overflows, exact at both tails, no libdevice needed.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0.0, -t, t)


@triton.jit
def _silu(x):
    # x * sigmoid(x), sigmoid from exp(-|x|) <= 1 so that it never overflows.
    e = tl.exp(-tl.abs(x))
    return x * tl.where(x < 0.0, e, 1.0) / (1.0 + e)


@triton.jit
def _act_and_mul_kernel(
    gate_up_ptr,   # [num_tokens, 2 * inter]: gate | up
    out_ptr,       # [num_tokens, inter]
    inter,
    stride_in, stride_out,
    ACT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    row = gate_up_ptr + token * stride_in
    g = tl.load(row + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(row + inter + cols, mask=mask, other=0.0).to(tl.float32)
    if ACT == _ACT_SILU:
        a = _silu(g)
    else:
        a = 0.5 * g * (1.0 + _tanh(0.7978845608028654 * (g + 0.044715 * g * g * g)))  # sqrt(2 / pi)
    dtype = out_ptr.dtype.element_ty
    out = a.to(dtype).to(tl.float32) * up
    tl.store(out_ptr + token * stride_out + cols, out.to(dtype), mask=mask)


def act_and_mul(
    gate_up: torch.Tensor,  # [num_tokens, 2 * intermediate]: gate | up
    activation: str,        # a key of ACTIVATION_CODES
) -> torch.Tensor:          # [num_tokens, intermediate]
    if activation not in ACTIVATION_CODES:
        raise ValueError(f"act_and_mul: activation {activation!r} is not one of {sorted(ACTIVATION_CODES)}")
    num_tokens, width = gate_up.shape
    inter = width // 2
    if gate_up.stride(1) != 1:
        gate_up = gate_up.contiguous()
    out = torch.empty(num_tokens, inter, dtype=gate_up.dtype, device=gate_up.device)
    if num_tokens == 0:
        return out
    block = min(next_pow2(inter), _MAX_BLOCK)
    _act_and_mul_kernel[(num_tokens, triton.cdiv(inter, block))](
        gate_up, out, inter, gate_up.stride(0), out.stride(0),
        ACT=ACTIVATION_CODES[activation], BLOCK=block, num_warps=4 if block >= 512 else 1,
    )
    return out
