"""The per-request draft walk of NUDGING.md section 5 (greedy), on the device.

One program per request walks that request's positions in order (a sequential dependency:
each position's rule depends on the mode and run the previous one left). The results equal
handoff_walk_torch. `_walk_step` is shared with the fused handoff_step kernel.
"""
from __future__ import annotations

import torch

from . import utils  # noqa: F401  (sets up the interpreter on GPU-less machines before triton)

import triton
import triton.language as tl

from nudge_engine.pairing.handoff_torch import BASE, NO_SOURCE, NO_TOKEN, NUDGE, SRC_BASE, SRC_NUDGER

_NO_TOKEN = tl.constexpr(NO_TOKEN)
_BASE = tl.constexpr(BASE)
_NUDGE = tl.constexpr(NUDGE)
_SRC_BASE = tl.constexpr(SRC_BASE)
_SRC_NUDGER = tl.constexpr(SRC_NUDGER)
_NO_SOURCE = tl.constexpr(NO_SOURCE)


@triton.jit
def _walk_step(mode, run, d, a, t1, gamma, resume_on_agreement, word_start_ptr):
    """One position of section 5 for one request (scalars). Mirrors handoff_torch.walk_step.

    Returns (source, emit, new_mode, new_run): source is SRC_BASE / SRC_NUDGER when the draft
    is accepted, else NO_SOURCE, and the walk stops there; emit says whether the base argmax
    `a` is emitted there.
    """
    has_draft = d != _NO_TOKEN
    ws = tl.load(word_start_ptr + tl.maximum(d, 0)) != 0
    ws = ws & has_draft
    in_base = mode == _BASE
    nudge_now = t1 < gamma                        # strict: top1 == gamma stays with the base
    resume = (t1 >= gamma) | ((resume_on_agreement != 0) & (a == d))
    hand_back = (run > 0) & ws & resume
    agree = a == d

    accept_nudger = has_draft & ((in_base & nudge_now) | (~in_base & ~hand_back))
    accept_base = has_draft & agree & ((in_base & ~nudge_now) | (~in_base & hand_back))
    emit = (in_base & ~nudge_now & (~has_draft | ~agree)) | (~in_base & has_draft & hand_back & ~agree)

    to_nudge = in_base & nudge_now
    to_base = ~in_base & has_draft & hand_back
    new_mode = tl.where(to_nudge, _NUDGE, tl.where(to_base, _BASE, mode))
    new_run = tl.where(to_nudge, has_draft.to(tl.int32),
                       tl.where(to_base, 0, tl.where(~in_base & has_draft, run + 1, run)))
    source = tl.where(accept_base, _SRC_BASE, tl.where(accept_nudger, _SRC_NUDGER, _NO_SOURCE))
    return source, emit, new_mode, new_run


@triton.jit
def _fold_step(walking, mode, run, emit_token, num_accepted, source, emit, step_mode, step_run, a):
    """Folds one position's decision into a request's walk. Positions after the walk stopped are
    still visited (no break in Triton) but change nothing."""
    source = tl.where(walking, source, _NO_SOURCE)
    emit_token = tl.where(walking & emit, a, emit_token)
    mode = tl.where(walking, step_mode, mode)
    run = tl.where(walking, step_run, run)
    num_accepted += (source != _NO_SOURCE).to(tl.int32)
    walking = walking & (source != _NO_SOURCE)
    return walking, mode, run, emit_token, num_accepted, source


@triton.jit
def _handoff_walk_kernel(
    base_argmax_ptr,   # [P] int64
    base_top1_ptr,     # [P] f32
    drafts_ptr,        # [P] int64, NO_TOKEN at each request's last position
    pos_start_ptr,     # [R + 1] int32
    mode_ptr,          # [R] int32
    run_ptr,           # [R] int32
    gamma_ptr,         # [R] f32
    roa_ptr,           # [R] int8 / int32, resume_on_agreement
    word_start_ptr,    # [vocab] int8
    num_accepted_ptr,  # [R] out int32
    emit_token_ptr,    # [R] out int64, NO_TOKEN = none
    new_mode_ptr,      # [R] out int32
    new_run_ptr,       # [R] out int32
    source_ptr,        # [P] out int8, NO_SOURCE where not accepted
):
    req = tl.program_id(0)
    lo = tl.load(pos_start_ptr + req)
    hi = tl.load(pos_start_ptr + req + 1)
    mode = tl.load(mode_ptr + req).to(tl.int32)
    run = tl.load(run_ptr + req).to(tl.int32)
    gamma = tl.load(gamma_ptr + req).to(tl.float32)
    roa = tl.load(roa_ptr + req).to(tl.int32)
    walking = lo >= 0  # always true; a tensor so that loop-carried types are stable
    num_accepted = tl.full([], 0, tl.int32)
    emit_token = tl.full([], _NO_TOKEN, tl.int64)
    for pos in range(lo, hi):
        d = tl.load(drafts_ptr + pos).to(tl.int64)
        a = tl.load(base_argmax_ptr + pos).to(tl.int64)
        t1 = tl.load(base_top1_ptr + pos).to(tl.float32)
        source, emit, step_mode, step_run = _walk_step(mode, run, d, a, t1, gamma, roa, word_start_ptr)
        walking, mode, run, emit_token, num_accepted, source = _fold_step(
            walking, mode, run, emit_token, num_accepted, source, emit, step_mode, step_run, a)
        tl.store(source_ptr + pos, source.to(tl.int8))
    tl.store(num_accepted_ptr + req, num_accepted)
    tl.store(emit_token_ptr + req, emit_token)
    tl.store(new_mode_ptr + req, mode)
    tl.store(new_run_ptr + req, run)


def as_int8(flags: torch.Tensor) -> torch.Tensor:
    # bool tensors go to Triton as int1 pointers; a zero-copy int8 view loads as plain bytes.
    return flags.view(torch.int8) if flags.dtype == torch.bool else flags


def handoff_walk(
    base_argmax: torch.Tensor,          # [P] int64
    base_top1: torch.Tensor,            # [P] float32
    drafts: torch.Tensor,               # [P] int64, NO_TOKEN at each request's last position
    pos_start: torch.Tensor,            # [R + 1] int32, request r owns [pos_start[r], pos_start[r + 1])
    mode: torch.Tensor,                 # [R] int32, BASE / NUDGE
    run: torch.Tensor,                  # [R] int32
    gamma: torch.Tensor,                # [R] float32
    resume_on_agreement: torch.Tensor,  # [R] bool / int
    word_start: torch.Tensor,           # [vocab] bool / int8
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(num_accepted [R] int32, emit_token [R] int64, new_mode [R] int32, new_run [R] int32,
    accepted_source [P] int8), as handoff_walk_torch."""
    num_req, num_pos = mode.shape[0], drafts.shape[0]
    dev = drafts.device
    num_accepted = torch.empty(num_req, dtype=torch.int32, device=dev)
    emit_token = torch.empty(num_req, dtype=torch.int64, device=dev)
    new_mode = torch.empty(num_req, dtype=torch.int32, device=dev)
    new_run = torch.empty(num_req, dtype=torch.int32, device=dev)
    source = torch.full((num_pos,), NO_SOURCE, dtype=torch.int8, device=dev)
    if num_req > 0:
        _handoff_walk_kernel[(num_req,)](
            base_argmax, base_top1, drafts, pos_start, mode, run, gamma,
            as_int8(resume_on_agreement), as_int8(word_start),
            num_accepted, emit_token, new_mode, new_run, source,
            num_warps=1,
        )
    return num_accepted, emit_token, new_mode, new_run, source
