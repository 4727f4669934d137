"""Handoff statistics and the draft walk (NUDGING.md section 5, greedy) in plain torch.

The CPU engine calls these in its hot path and the Triton kernels in `nudge_engine.kernels`
(top1_stats, handoff_walk, handoff_step) must match them. No softmax tensor is ever built: the
walk needs only the base model's argmax and top-1 probability, top1 = exp(max_logit - lse).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

NO_TOKEN = -1    # "no token here": no draft at a request's last position, no emitted token
BASE = 0         # mode: the base model writes
NUDGE = 1        # mode: the nudger writes
SRC_BASE = 0     # accepted_source: the token is the base model's greedy token
SRC_NUDGER = 1   # accepted_source: the token is the nudger's
NO_SOURCE = -1   # accepted_source of a position whose draft was not accepted


def top1_stats_torch(
    logits: torch.Tensor,                # [num_positions, vocab] float32 / bfloat16
    tokens: torch.Tensor | None = None,  # [num_positions] int, NO_TOKEN = none
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(max [P] f32, argmax [P] int64, lse [P] f32, token_logprob [P] f32) of each row.

    argmax takes the lowest index on ties (torch.argmax); token_logprob is -inf for NO_TOKEN.
    """
    x = logits.float()
    # One pass for both; torch.max, like torch.argmax, returns the first index of a tie.
    row_max, row_argmax = x.max(dim=-1)
    lse = torch.logsumexp(x, dim=-1)
    if tokens is None:
        token_logprob = torch.full_like(lse, float("-inf"))
    else:
        tokens = tokens.long()
        picked = x.gather(1, tokens.clamp(min=0)[:, None])[:, 0]
        token_logprob = torch.where(tokens != NO_TOKEN, picked - lse, float("-inf"))
    return row_max, row_argmax, lse, token_logprob


def walk_step(mode, run, d, a, t1, gamma, resume_on_agreement, word_start_d):
    """One position of the section-5 walk for every still-walking request (tensors [R]).

    Returns (accept_base, accept_nudger, emit, new_mode, new_run): `emit` means the base
    model's argmax `a` is emitted at this position and the walk stops; a position that is
    neither accepted nor emitting also stops the walk (no draft: the nudger writes it next round).
    """
    has_draft = d != NO_TOKEN
    in_base = mode == BASE
    nudge_now = t1 < gamma                       # strict: top1 == gamma stays with the base
    resume = (t1 >= gamma) | (resume_on_agreement & (a == d))
    hand_back = (run > 0) & word_start_d & resume
    agree = a == d

    accept_nudger = has_draft & ((in_base & nudge_now) | (~in_base & ~hand_back))
    accept_base = has_draft & agree & ((in_base & ~nudge_now) | (~in_base & hand_back))
    emit = (in_base & ~nudge_now & (~has_draft | ~agree)) | (~in_base & has_draft & hand_back & ~agree)

    to_nudge = in_base & nudge_now
    to_base = ~in_base & has_draft & hand_back
    new_mode = torch.where(to_nudge, NUDGE, torch.where(to_base, BASE, mode))
    new_run = torch.where(to_nudge, has_draft.to(run.dtype),
                          torch.where(to_base, 0, torch.where(~in_base & has_draft, run + 1, run)))
    return accept_base, accept_nudger, emit, new_mode, new_run


def handoff_walk_torch(
    base_argmax: torch.Tensor,          # [P] int64, argmax of the base model's raw logits
    base_top1: torch.Tensor,            # [P] float32, top-1 probability of those logits
    drafts: torch.Tensor,               # [P] int64, the nudger's draft at each position, NO_TOKEN at the last
    pos_start: torch.Tensor,            # [R + 1] int32, request r owns [pos_start[r], pos_start[r + 1])
    mode: torch.Tensor,                 # [R] int32, BASE / NUDGE at the first position
    run: torch.Tensor,                  # [R] int32, nudger tokens written in the current nudge run
    gamma: torch.Tensor,                # [R] float32
    resume_on_agreement: torch.Tensor,  # [R] bool / int
    word_start: torch.Tensor,           # [vocab] bool / int8
    max_len: int | None = None,         # max(pos_start diffs) when the host knows it: no device read
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(num_accepted [R] int32, emit_token [R] int64, new_mode [R] int32, new_run [R] int32,
    accepted_source [P] int8: SRC_BASE / SRC_NUDGER where accepted, NO_SOURCE elsewhere).

    Vectorized across requests: one iteration per position index j, so the cost is
    max(k) + 1 small torch ops batches, whatever the number of requests.
    """
    device = drafts.device
    num_req, num_pos = mode.shape[0], drafts.shape[0]
    starts = pos_start[:-1].long()
    lens = pos_start[1:].long() - starts
    cur_mode = mode.to(torch.int32).clone()
    cur_run = run.to(torch.int32).clone()
    gamma = gamma.float()
    roa = resume_on_agreement.bool()
    ws = word_start.bool()
    walking = torch.ones(num_req, dtype=torch.bool, device=device)
    num_accepted = torch.zeros(num_req, dtype=torch.int32, device=device)
    emit_token = torch.full((num_req,), NO_TOKEN, dtype=torch.int64, device=device)
    source = torch.full((num_pos,), NO_SOURCE, dtype=torch.int8, device=device)
    if max_len is None:
        max_len = int(lens.max()) if num_req > 0 else 0

    for j in range(max_len):
        walking &= j < lens
        pos = (starts + j).clamp(max=max(num_pos - 1, 0))
        d = drafts[pos].long()
        a = base_argmax[pos].long()
        t1 = base_top1[pos].float()
        ws_d = ws[d.clamp(min=0)] & (d != NO_TOKEN)
        acc_b, acc_n, emit, new_mode, new_run = walk_step(cur_mode, cur_run, d, a, t1, gamma, roa, ws_d)
        accepted = walking & (acc_b | acc_n)
        cur_mode = torch.where(walking, new_mode, cur_mode)
        cur_run = torch.where(walking, new_run, cur_run)
        emit_token = torch.where(walking & emit, a, emit_token)
        num_accepted += accepted.to(torch.int32)
        src = torch.where(acc_b, SRC_BASE, SRC_NUDGER).to(torch.int8)
        source[pos[accepted]] = src[accepted]
        walking &= accepted
    return num_accepted, emit_token, cur_mode, cur_run, source


@dataclass
class HandoffStep:
    """Everything the host needs after the base forward of a round, packed in ONE int32 tensor
    on the device, so that a step costs a single small device-to-host copy.

    Layout of `packed` ([4 R + 3 P] int32): num_accepted[R], emit_token[R], new_mode[R],
    new_run[R], accepted_source[P], base_argmax[P], base_top1[P] (float32 bits).
    """
    packed: torch.Tensor  # [4 * num_req + 3 * num_pos] int32
    num_req: int
    num_pos: int

    def to_host(self) -> "HandoffResult":
        host = self.packed if self.packed.device.type == "cpu" else self.packed.cpu()  # read once (host_read)
        r, p = self.num_req, self.num_pos
        return HandoffResult(
            num_accepted=host[0:r],
            emit_token=host[r:2 * r].long(),
            new_mode=host[2 * r:3 * r],
            new_run=host[3 * r:4 * r],
            accepted_source=host[4 * r:4 * r + p].to(torch.int8),
            base_argmax=host[4 * r + p:4 * r + 2 * p].long(),
            base_top1=host[4 * r + 2 * p:4 * r + 3 * p].view(torch.float32),
        )


@dataclass
class HandoffResult:
    num_accepted: torch.Tensor     # [R] int32
    emit_token: torch.Tensor       # [R] int64, NO_TOKEN = none
    new_mode: torch.Tensor         # [R] int32
    new_run: torch.Tensor          # [R] int32
    accepted_source: torch.Tensor  # [P] int8, NO_SOURCE where not accepted
    base_argmax: torch.Tensor      # [P] int64
    base_top1: torch.Tensor        # [P] float32


def new_packed(num_req: int, num_pos: int, device) -> torch.Tensor:
    return torch.empty(4 * num_req + 3 * num_pos, dtype=torch.int32, device=device)


def handoff_step_torch(
    logits: torch.Tensor,               # [P, vocab] float32 / bfloat16, the base model's raw logits
    drafts: torch.Tensor,               # [P] int64
    pos_start: torch.Tensor,            # [R + 1] int32
    mode: torch.Tensor,                 # [R] int32
    run: torch.Tensor,                  # [R] int32
    gamma: torch.Tensor,                # [R] float32
    resume_on_agreement: torch.Tensor,  # [R] bool / int
    word_start: torch.Tensor,           # [vocab] bool / int8
    max_len: int | None = None,         # as in handoff_walk_torch
) -> HandoffStep:
    """Stats + walk with the packed result of the Triton `handoff_step` (the CPU engine's path)."""
    row_max, base_argmax, lse, _ = top1_stats_torch(logits)
    base_top1 = torch.exp(row_max - lse)
    acc, emit, new_mode, new_run, source = handoff_walk_torch(
        base_argmax, base_top1, drafts, pos_start, mode, run, gamma, resume_on_agreement, word_start, max_len)
    r, p = mode.shape[0], drafts.shape[0]
    packed = new_packed(r, p, logits.device)
    packed[0:r] = acc
    packed[r:2 * r] = emit.to(torch.int32)
    packed[2 * r:3 * r] = new_mode
    packed[3 * r:4 * r] = new_run
    packed[4 * r:4 * r + p] = source.to(torch.int32)
    packed[4 * r + p:4 * r + 2 * p] = base_argmax.to(torch.int32)
    packed[4 * r + 2 * p:4 * r + 3 * p] = base_top1.view(torch.int32)
    return HandoffStep(packed, r, p)
