"""The walk of NUDGING.md section 5 for a request where either model samples (host, per request).

Greedy requests go through the batched handoff kernel; this path covers temperature > 0 with
rejection sampling, which keeps the output distribution equal to sequential nudging.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.request import Mode, Source
from ..engine.sampler import draw, uniform


@dataclass
class WalkResult:
    num_accepted: int
    emit_token: int | None
    mode: Mode
    run: int
    accepted_sources: list[int]


def sampling_walk(
    drafts: list[int],          # k draft tokens
    base_top1: torch.Tensor,    # [k + 1] raw top-1 probability of the base
    base_argmax: torch.Tensor,  # [k + 1] raw argmax of the base
    base_probs: torch.Tensor,   # [k + 1, vocab] base processed distribution p'
    draft_probs: torch.Tensor,  # [k, vocab] the distribution q each draft was drawn from
    mode: Mode, run: int, gamma: float, resume_on_agreement: bool,
    word_start: torch.Tensor,   # [vocab] bool
    generator: torch.Generator,
) -> WalkResult:
    sources: list[int] = []
    for i in range(len(drafts) + 1):
        d = drafts[i] if i < len(drafts) else None
        top1, argmax = float(base_top1[i]), int(base_argmax[i])
        if mode == Mode.BASE:
            if top1 < gamma:
                mode, run = Mode.NUDGE, 0
                if d is None:
                    return WalkResult(i, None, mode, run, sources)
                sources.append(Source.NUDGER)
                run = 1
                continue
            if d is None:
                return WalkResult(i, draw(base_probs[i], generator), mode, run, sources)
            p, q = float(base_probs[i, d]), float(draft_probs[i, d])
            if q > 0 and uniform(generator) < min(1.0, p / q):
                sources.append(Source.BASE)
                continue
            residual = (base_probs[i] - draft_probs[i]).clamp_min(0.0)
            if float(residual.sum()) <= 0.0:  # p' == q: any rejection is measure-zero; draw from p'
                residual = base_probs[i]
            return WalkResult(i, draw(residual, generator), mode, run, sources)
        if d is None:
            return WalkResult(i, None, mode, run, sources)
        resume = top1 >= gamma or (resume_on_agreement and argmax == d)
        if run > 0 and bool(word_start[d]) and resume:
            mode, run = Mode.BASE, 0
            fresh = draw(base_probs[i], generator)
            if fresh == d:
                sources.append(Source.BASE)
                continue
            return WalkResult(i, fresh, mode, run, sources)
        sources.append(Source.NUDGER)
        run += 1
    raise AssertionError("unreachable: the last position has no draft")
