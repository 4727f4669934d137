"""Per-row max, argmax, log-sum-exp and one token's log-probability of a logits matrix, in one
read of the logits and without a softmax tensor (same results as top1_stats_torch).

Stage 1 splits the vocabulary of every row across programs, so a single row (batch-1 decode
over a 256k vocabulary) still spreads over the GPU; each program keeps per-lane running
(max, first index of the max, sum of exp relative to that max), needing one exp per logit.
Stage 2 merges the splits of a row. `_combine_row` is also called by the fused handoff_step.
"""
from __future__ import annotations

import torch

from . import utils  # noqa: F401  (sets up the interpreter on GPU-less machines before triton)
from .utils import is_interpreter, next_pow2, num_sms

import triton
import triton.language as tl

from nudge_engine.pairing.handoff_torch import NO_TOKEN

_NO_TOKEN = tl.constexpr(NO_TOKEN)
_NO_INDEX = tl.constexpr(2**31 - 1)   # "no index yet": larger than any vocabulary index
_MAX_SPLITS = 256


@triton.jit
def _top1_partial_kernel(
    logits_ptr,    # [num_positions, vocab] float32 / bfloat16
    part_max_ptr,  # [num_positions, num_splits] f32
    part_arg_ptr,  # [num_positions, num_splits] int32, lowest index of the split's max
    part_sum_ptr,  # [num_positions, num_splits] f32, sum of exp(x - split max)
    vocab,
    stride_row,
    num_splits,
    split_len,     # a multiple of BLOCK_V
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    split = tl.program_id(1)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    lo = split * split_len
    hi = tl.minimum(lo + split_len, vocab)

    m = tl.full([BLOCK_V], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_V], tl.float32)
    idx = tl.full([BLOCK_V], _NO_INDEX, tl.int32)
    for v0 in range(lo, hi, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        ok = offs < hi
        x = tl.load(row_ptr + offs, mask=ok, other=float("-inf")).to(tl.float32)
        # Strict > keeps each lane's first maximum (lanes see ascending indices); the first
        # valid element always counts, so an all -inf row still reports index 0 like torch.
        take = ok & ((x > m) | (idx == _NO_INDEX))
        # One exp per logit: the rescale of the old sum when x is the new max, else exp(x - m).
        e = tl.exp(tl.where(x > m, m - x, x - m))
        e = tl.where(x == float("-inf"), 0.0, e)
        s = tl.where(x > m, s * e + 1.0, s + e)
        idx = tl.where(take, offs, idx)
        m = tl.maximum(m, x)

    split_max = tl.max(m, axis=0)
    split_arg = tl.min(tl.where((m == split_max) & (idx != _NO_INDEX), idx, _NO_INDEX), axis=0)
    split_sum = tl.sum(tl.where(m == float("-inf"), 0.0, s * tl.exp(m - split_max)), axis=0)
    out = row * num_splits + split
    tl.store(part_max_ptr + out, split_max)
    tl.store(part_arg_ptr + out, split_arg)
    tl.store(part_sum_ptr + out, split_sum)


@triton.jit
def _combine_row(part_max_ptr, part_arg_ptr, part_sum_ptr, row, num_splits, SPLITS_PAD: tl.constexpr):
    """(max, argmax, lse) of one row from its split partials."""
    offs = tl.arange(0, SPLITS_PAD)
    ok = offs < num_splits
    base = row * num_splits  # positions x splits stays far below 2**31
    pm = tl.load(part_max_ptr + base + offs, mask=ok, other=float("-inf"))
    pa = tl.load(part_arg_ptr + base + offs, mask=ok, other=_NO_INDEX)
    ps = tl.load(part_sum_ptr + base + offs, mask=ok, other=0.0)
    row_max = tl.max(pm, axis=0)
    # Splits are in index order and each reports its lowest max index: the lowest overall wins.
    row_arg = tl.min(tl.where(ok & (pm == row_max), pa, _NO_INDEX), axis=0)
    total = tl.sum(tl.where(pm == float("-inf"), 0.0, ps * tl.exp(pm - row_max)), axis=0)
    # An all -inf row: total = 0, lse = -inf (torch.logsumexp gives -inf too).
    lse = tl.where(total == 0.0, float("-inf"), row_max + tl.log(tl.where(total == 0.0, 1.0, total)))
    return row_max, row_arg, lse


@triton.jit
def _top1_combine_kernel(
    logits_ptr,    # [num_positions, vocab]
    tokens_ptr,    # [num_positions] int, NO_TOKEN = none (unused unless HAS_TOKENS)
    part_max_ptr,  # [num_positions, num_splits] f32
    part_arg_ptr,  # [num_positions, num_splits] int32
    part_sum_ptr,  # [num_positions, num_splits] f32
    max_ptr,       # [num_positions] f32
    argmax_ptr,    # [num_positions] int64
    lse_ptr,       # [num_positions] f32
    logprob_ptr,   # [num_positions] f32
    stride_row,
    num_splits,
    HAS_TOKENS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
):
    row = tl.program_id(0)
    row_max, row_arg, lse = _combine_row(part_max_ptr, part_arg_ptr, part_sum_ptr, row, num_splits, SPLITS_PAD)
    tl.store(max_ptr + row, row_max)
    tl.store(argmax_ptr + row, row_arg.to(tl.int64))
    tl.store(lse_ptr + row, lse)
    logprob = tl.full([], float("-inf"), tl.float32)
    if HAS_TOKENS:
        tok = tl.load(tokens_ptr + row).to(tl.int64)
        picked = tl.load(logits_ptr + row.to(tl.int64) * stride_row + tl.maximum(tok, 0)).to(tl.float32)
        logprob = tl.where(tok != _NO_TOKEN, picked - lse, float("-inf"))
    tl.store(logprob_ptr + row, logprob)


def plan_splits(num_positions: int, vocab: int, device: torch.device) -> tuple[int, int, int]:
    """(num_splits, split_len, BLOCK_V): enough programs to cover the GPU twice over."""
    block_v = 1024 if not is_interpreter() else 256
    block_v = min(block_v, max(32, next_pow2(vocab)))
    want = triton.cdiv(2 * num_sms(device), max(num_positions, 1))
    splits = max(1, min(want, triton.cdiv(vocab, block_v), _MAX_SPLITS))
    split_len = triton.cdiv(triton.cdiv(vocab, splits), block_v) * block_v
    return triton.cdiv(vocab, split_len), split_len, block_v


def top1_partials(
    logits: torch.Tensor,  # [num_positions, vocab] float32 / bfloat16
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Stage 1: (part_max, part_arg, part_sum) each [num_positions, num_splits], and num_splits."""
    num_pos, vocab = logits.shape
    assert vocab >= 1 and logits.stride(1) == 1
    splits, split_len, block_v = plan_splits(num_pos, vocab, logits.device)
    if num_splits is not None:  # tests force a split count to cover the merge
        split_len = triton.cdiv(triton.cdiv(vocab, num_splits), block_v) * block_v
        splits = triton.cdiv(vocab, split_len)
    dev = logits.device
    part_max = torch.empty(num_pos, splits, dtype=torch.float32, device=dev)
    part_arg = torch.empty(num_pos, splits, dtype=torch.int32, device=dev)
    part_sum = torch.empty(num_pos, splits, dtype=torch.float32, device=dev)
    if num_pos > 0:
        _top1_partial_kernel[(num_pos, splits)](
            logits, part_max, part_arg, part_sum, vocab, logits.stride(0), splits, split_len,
            BLOCK_V=block_v, num_warps=4 if block_v >= 1024 else 1,
        )
    return part_max, part_arg, part_sum, splits


def top1_stats(
    logits: torch.Tensor,                # [num_positions, vocab] float32 / bfloat16
    tokens: torch.Tensor | None = None,  # [num_positions] int, NO_TOKEN = none
    *,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(max [P] f32, argmax [P] int64, lse [P] f32, token_logprob [P] f32); top1 = exp(max - lse)."""
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    num_pos = logits.shape[0]
    part_max, part_arg, part_sum, splits = top1_partials(logits, num_splits)
    dev = logits.device
    row_max = torch.empty(num_pos, dtype=torch.float32, device=dev)
    row_arg = torch.empty(num_pos, dtype=torch.int64, device=dev)
    lse = torch.empty(num_pos, dtype=torch.float32, device=dev)
    logprob = torch.empty(num_pos, dtype=torch.float32, device=dev)
    if num_pos > 0:
        _top1_combine_kernel[(num_pos,)](
            logits, tokens if tokens is not None else row_arg,
            part_max, part_arg, part_sum, row_max, row_arg, lse, logprob,
            logits.stride(0), splits,
            HAS_TOKENS=tokens is not None, SPLITS_PAD=next_pow2(splits), num_warps=1,
        )
    return row_max, row_arg, lse, logprob
