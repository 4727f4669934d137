"""Decides every final request of a round: the fused greedy walk for all greedy requests at once,
rejection sampling on the host for requests where a model samples."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .handoff_torch import NO_TOKEN, handoff_step_torch, top1_stats_torch
from ..engine.request import Mode, Request, Source
from ..engine.sampler import processed_probs
from .sampling_walk import sampling_walk


@dataclass
class Decision:
    num_accepted: int
    emit_token: int | None
    mode: int
    run: int
    accepted_sources: list[int]
    logprobs: list[dict[int, float]] | None   # per decided token, when the request asked


class Handoff:
    def __init__(self, device: torch.device, word_start: torch.Tensor, use_triton: bool):
        self.device = device
        self.word_start_host = word_start                  # [vocab] bool
        self.word_start = word_start.to(device)            # [vocab] bool
        self._step = handoff_step_torch
        if use_triton:  # with the Triton attention backend: on CUDA, or interpreted in tests
            from ..kernels.handoff_step import handoff_step
            self._step = handoff_step

    def decide(
        self,
        reqs: list[Request],
        drafts: list[list[int]],
        walk_rows: list[slice],              # each request's rows in base_logits: k + 1 of them
        base_logits: torch.Tensor,           # [rows, vocab] float32
        draft_logits: list[list[torch.Tensor]],  # per request, per draft: the nudger's raw logits [vocab]
    ) -> list[Decision | Exception]:
        """One Decision per request, or the exception that ended that request's own part of the walk
        (its sampling walk or its logprobs): a request's failure is not the others'."""
        decisions: list[Decision | Exception | None] = [None] * len(reqs)
        greedy = [i for i, r in enumerate(reqs) if r.greedy]
        if greedy:
            self._decide_greedy(greedy, reqs, drafts, walk_rows, base_logits, decisions)
        sampled = [i for i, r in enumerate(reqs) if not r.greedy]
        if sampled:
            self._decide_sampled(sampled, reqs, drafts, walk_rows, base_logits, draft_logits, decisions)
        for i, r in enumerate(reqs):
            if r.logprobs is not None and isinstance(decisions[i], Decision):
                try:
                    decisions[i].logprobs = _decision_logprobs(decisions[i], drafts[i], base_logits[walk_rows[i]],
                                                               draft_logits[i], r.params.logprobs)
                except Exception as e:  # noqa: BLE001
                    decisions[i] = e
        return decisions

    def _decide_greedy(self, idx, reqs, drafts, walk_rows, base_logits, decisions) -> None:
        if all(not drafts[i] and reqs[i].gamma <= 0 for i in idx):
            # No drafts and a base that always writes (top1 >= 0): the walk is the argmax.
            rows = torch.tensor([walk_rows[i].start for i in idx], device=base_logits.device)
            for i, tok in zip(idx, base_logits[rows].argmax(-1).tolist()):
                decisions[i] = Decision(0, tok, int(reqs[i].mode), reqs[i].run, [], None)
            return
        rows = torch.cat([torch.arange(walk_rows[i].start, walk_rows[i].stop) for i in idx]).to(self.device)
        flat_drafts = []
        starts = [0]
        for i in idx:
            flat_drafts.extend(drafts[i] + [NO_TOKEN])
            starts.append(len(flat_drafts))
        dev = self.device
        result = self._step(
            base_logits[rows],
            torch.tensor(flat_drafts, dtype=torch.int64, device=dev),
            torch.tensor(starts, dtype=torch.int32, device=dev),
            torch.tensor([int(reqs[i].mode) for i in idx], dtype=torch.int32, device=dev),
            torch.tensor([reqs[i].run for i in idx], dtype=torch.int32, device=dev),
            torch.tensor([reqs[i].gamma for i in idx], dtype=torch.float32, device=dev),
            torch.tensor([reqs[i].resume_on_agreement for i in idx], dtype=torch.bool, device=dev),
            self.word_start,
        ).to_host()  # the round's one small device-to-host copy
        accepted = result.num_accepted.tolist()
        emitted = result.emit_token.tolist()
        modes, runs = result.new_mode.tolist(), result.new_run.tolist()
        sources = result.accepted_source.tolist()
        for j, i in enumerate(idx):
            m = accepted[j]
            decisions[i] = Decision(m, None if emitted[j] == NO_TOKEN else emitted[j], modes[j], runs[j],
                                    sources[starts[j]:starts[j] + m], None)

    def _decide_sampled(self, idx, reqs, drafts, walk_rows, base_logits, draft_logits, decisions) -> None:
        """Rejection sampling per request, on distributions computed for all of them at once."""
        rows = torch.cat([torch.arange(walk_rows[i].start, walk_rows[i].stop) for i in idx])
        logits = base_logits[rows.to(base_logits.device)].cpu()                # [rows, vocab]
        row_max, argmax, lse, _ = top1_stats_torch(logits)
        top1 = torch.exp(row_max - lse)                                          # raw: the handoff test
        base_probs = processed_probs(logits, [reqs[i].params for i in idx for _ in range(len(drafts[i]) + 1)])
        flat_drafts = [row for i in idx for row in draft_logits[i]]
        vocab = logits.shape[-1]
        draft_probs = (processed_probs(torch.stack(flat_drafts).cpu(),
                                       [reqs[i].nudger_params for i in idx for _ in draft_logits[i]])
                       if flat_drafts else torch.empty(0, vocab))
        at, dat = 0, 0
        for i in idx:
            r, k = reqs[i], len(drafts[i])
            try:
                w = sampling_walk(drafts[i], top1[at:at + k + 1], argmax[at:at + k + 1], base_probs[at:at + k + 1],
                                  draft_probs[dat:dat + k], Mode(r.mode), r.run, r.gamma, r.resume_on_agreement,
                                  self.word_start_host, r.generator)
                decisions[i] = Decision(w.num_accepted, w.emit_token, int(w.mode), w.run, w.accepted_sources, None)
            except Exception as e:  # noqa: BLE001
                decisions[i] = e
            at, dat = at + k + 1, dat + k


def _decision_logprobs(d: Decision, drafts: list[int], base_rows: torch.Tensor, draft_rows: list[torch.Tensor],
                       top_n: int) -> list[dict[int, float]]:
    """Log-probabilities under the model that wrote each token (raw logits, temperature 1)."""
    out = []
    tokens = drafts[:d.num_accepted] + ([d.emit_token] if d.emit_token is not None else [])
    sources = d.accepted_sources + [Source.BASE]
    for pos, (tok, src) in enumerate(zip(tokens, sources)):
        row = draft_rows[pos] if src == Source.NUDGER else base_rows[pos]
        lp = torch.log_softmax(row.float().cpu(), dim=-1)
        entry = {int(tok): float(lp[tok])}
        if top_n > 0:
            vals, ids = lp.topk(top_n)
            for v, t in zip(vals.tolist(), ids.tolist()):
                entry.setdefault(t, v)
        out.append(entry)
    return out
