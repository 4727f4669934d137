"""Everything a round needs after the base model's forward, on the device, in two launches:
top1 stage 1 over the vocabulary, then one program per request that merges its positions'
partials (max, argmax, lse -> top1 = exp(max - lse)) and walks them (section 5).

The results land in one packed int32 tensor (layout in handoff_torch.HandoffStep), so the host
makes ONE small copy per step. No softmax tensor anywhere.
"""
from __future__ import annotations

import torch

from . import utils  # noqa: F401  (sets up the interpreter on GPU-less machines before triton)
from .handoff_walk import _fold_step, _walk_step, as_int8
from .top1_stats import _combine_row, top1_partials
from .utils import next_pow2

import triton
import triton.language as tl

from nudge_engine.pairing.handoff_torch import NO_SOURCE, NO_TOKEN, HandoffStep, new_packed

_NO_TOKEN = tl.constexpr(NO_TOKEN)
_NO_SOURCE = tl.constexpr(NO_SOURCE)


@triton.jit
def _handoff_step_kernel(
    part_max_ptr,      # [P, num_splits] f32
    part_arg_ptr,      # [P, num_splits] int32
    part_sum_ptr,      # [P, num_splits] f32
    drafts_ptr,        # [P] int64, NO_TOKEN at each request's last position
    pos_start_ptr,     # [R + 1] int32
    mode_ptr,          # [R] int32
    run_ptr,           # [R] int32
    gamma_ptr,         # [R] f32
    roa_ptr,           # [R] int8 / int32, resume_on_agreement
    word_start_ptr,    # [vocab] int8
    packed_ptr,        # [4 R + 3 P] int32 out: see HandoffStep
    top1_out_ptr,      # [P] f32 out, the float32 view of the packed tail
    num_req,
    num_pos,
    num_splits,
    SPLITS_PAD: tl.constexpr,
):
    req = tl.program_id(0)
    lo = tl.load(pos_start_ptr + req)
    hi = tl.load(pos_start_ptr + req + 1)
    mode = tl.load(mode_ptr + req).to(tl.int32)
    run = tl.load(run_ptr + req).to(tl.int32)
    gamma = tl.load(gamma_ptr + req).to(tl.float32)
    roa = tl.load(roa_ptr + req).to(tl.int32)
    walking = lo >= 0
    num_accepted = tl.full([], 0, tl.int32)
    emit_token = tl.full([], _NO_TOKEN, tl.int64)
    source_out = packed_ptr + 4 * num_req
    argmax_out = packed_ptr + 4 * num_req + num_pos
    for pos in range(lo, hi):
        row_max, row_arg, lse = _combine_row(part_max_ptr, part_arg_ptr, part_sum_ptr, pos, num_splits, SPLITS_PAD)
        a = row_arg.to(tl.int64)
        t1 = tl.exp(row_max - lse)
        d = tl.load(drafts_ptr + pos).to(tl.int64)
        source, emit, step_mode, step_run = _walk_step(mode, run, d, a, t1, gamma, roa, word_start_ptr)
        walking, mode, run, emit_token, num_accepted, source = _fold_step(
            walking, mode, run, emit_token, num_accepted, source, emit, step_mode, step_run, a)
        # Positions after the stop still report their statistics.
        tl.store(source_out + pos, source)
        tl.store(argmax_out + pos, row_arg)
        tl.store(top1_out_ptr + pos, t1)
    tl.store(packed_ptr + req, num_accepted)
    tl.store(packed_ptr + num_req + req, emit_token.to(tl.int32))
    tl.store(packed_ptr + 2 * num_req + req, mode)
    tl.store(packed_ptr + 3 * num_req + req, run)


def handoff_step(
    logits: torch.Tensor,               # [P, vocab] float32 / bfloat16, the base model's raw logits
    drafts: torch.Tensor,               # [P] int64, NO_TOKEN at each request's last position
    pos_start: torch.Tensor,            # [R + 1] int32, request r owns [pos_start[r], pos_start[r + 1])
    mode: torch.Tensor,                 # [R] int32, BASE / NUDGE
    run: torch.Tensor,                  # [R] int32
    gamma: torch.Tensor,                # [R] float32
    resume_on_agreement: torch.Tensor,  # [R] bool / int
    word_start: torch.Tensor,           # [vocab] bool / int8
    *,
    num_splits: int | None = None,
) -> HandoffStep:
    """Same packed result as handoff_torch.handoff_step_torch; `.to_host()` is the one copy."""
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    num_req, num_pos = mode.shape[0], drafts.shape[0]
    packed = new_packed(num_req, num_pos, logits.device)
    if num_req == 0:
        return HandoffStep(packed, num_req, num_pos)
    part_max, part_arg, part_sum, splits = top1_partials(logits, num_splits)
    top1_view = packed[4 * num_req + 2 * num_pos:].view(torch.float32)
    _handoff_step_kernel[(num_req,)](
        part_max, part_arg, part_sum, drafts, pos_start, mode, run, gamma,
        as_int8(resume_on_agreement), as_int8(word_start),
        packed, top1_view, num_req, num_pos, splits,
        SPLITS_PAD=next_pow2(splits), num_warps=1,
    )
    return HandoffStep(packed, num_req, num_pos)
