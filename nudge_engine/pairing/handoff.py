"""Decides every final request of a round: the fused greedy walk for all greedy requests at once,
rejection sampling on the host for requests where a model samples."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .handoff_torch import NO_TOKEN, HandoffStep, handoff_step_torch, top1_stats_torch
from ..engine.request import Mode, Request, Source
from ..engine.sampler import processed_probs
from .host_read import host_read
from .sampling_walk import sampling_walk
from .walk_logprobs import from_rows, pack_on_device, packed_size, unpack


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
        self._walk_bound = True   # the torch walk takes its loop bound from the host (no device read)
        self._no_token = torch.full((1,), NO_TOKEN, dtype=torch.long, device=device)  # [1]
        if use_triton:  # with the Triton attention backend: on CUDA, or interpreted in tests
            from ..kernels.handoff_step import handoff_step
            self._step = handoff_step
            self._walk_bound = False

    def decide(
        self,
        reqs: list[Request],
        drafts: list[list[int]],
        walk_rows: list[slice],              # each request's rows in base_logits: k + 1 of them
        base_logits: torch.Tensor,           # [rows, vocab] float32
        draft_logits: list[list[torch.Tensor]],  # per request, per draft: the nudger's raw logits [vocab]
        draft_values: list[torch.Tensor] | None = None,  # per request [len(drafts[i])] int64 on the device
    ) -> list[Decision | Exception]:
        """One Decision per request, or the exception that ended that request's own part of the walk
        (its sampling walk or its logprobs): a request's failure is not the others'. Logprobs ride
        in the walk's read (pairing/walk_logprobs.py).

        With draft_values the drafts' values live on the device (pairing/device_drafts.py) and
        `drafts` holds placeholders: the walk's one host read brings the values, written into
        `drafts` in place."""
        decisions: list[Decision | Exception | None] = [None] * len(reqs)
        greedy = [i for i, r in enumerate(reqs) if r.greedy]
        if greedy:
            self._decide_greedy(greedy, reqs, drafts, walk_rows, base_logits, decisions, draft_logits, draft_values)
        sampled = [i for i, r in enumerate(reqs) if not r.greedy]
        if sampled:
            self._decide_sampled(sampled, reqs, drafts, walk_rows, base_logits, draft_logits, decisions,
                                 draft_values)
        return decisions

    def _flat_drafts(self, idx, drafts, draft_values) -> tuple[torch.Tensor, list[int]]:
        """Each request's drafts then NO_TOKEN, concatenated: ([P] int64 on the device, starts [R + 1])."""
        starts = [0]
        for i in idx:
            starts.append(starts[-1] + len(drafts[i]) + 1)
        if draft_values is None:
            host = [t for i in idx for t in drafts[i] + [NO_TOKEN]]
            return torch.tensor(host, dtype=torch.int64, device=self.device), starts
        return torch.cat([t for i in idx for t in (draft_values[i].to(self.device), self._no_token)]), starts

    @staticmethod
    def _settle(idx, drafts, values: list[int], starts: list[int]) -> None:
        for j, i in enumerate(idx):
            drafts[i][:] = values[starts[j]:starts[j] + len(drafts[i])]

    def _decide_greedy(self, idx, reqs, drafts, walk_rows, base_logits, decisions, draft_logits,
                       draft_values=None) -> None:
        if all(not drafts[i] and reqs[i].gamma <= 0 and reqs[i].logprobs is None for i in idx):
            # No drafts and a base that always writes (top1 >= 0): the walk is the argmax.
            rows = torch.tensor([walk_rows[i].start for i in idx], device=base_logits.device)
            for i, tok in zip(idx, host_read(base_logits[rows].argmax(-1)).tolist()):
                decisions[i] = Decision(0, tok, int(reqs[i].mode), reqs[i].run, [], None)
            return
        rows = torch.cat([torch.arange(walk_rows[i].start, walk_rows[i].stop) for i in idx]).to(self.device)
        flat_drafts, starts = self._flat_drafts(idx, drafts, draft_values)
        dev = self.device
        step = self._step(
            base_logits[rows],
            flat_drafts,
            torch.tensor(starts, dtype=torch.int32, device=dev),
            torch.tensor([int(reqs[i].mode) for i in idx], dtype=torch.int32, device=dev),
            torch.tensor([reqs[i].run for i in idx], dtype=torch.int32, device=dev),
            torch.tensor([reqs[i].gamma for i in idx], dtype=torch.float32, device=dev),
            torch.tensor([reqs[i].resume_on_agreement for i in idx], dtype=torch.bool, device=dev),
            self.word_start,
            **({"max_len": max(b - a for a, b in zip(starts, starts[1:]))} if self._walk_bound else {}),
        )
        lp_packs, failed = self._pack_logprobs(idx, reqs, drafts, walk_rows, base_logits, draft_logits,
                                               draft_values, step)
        # The round's one small device-to-host copy: the walk's packed result, the drafts' values and
        # the logprobs asked for (float32 bits).
        n_packed, n_drafts = step.packed.shape[0], flat_drafts.shape[0]
        host = host_read(torch.cat([step.packed, flat_drafts.to(torch.int32)]
                                   + [p.view(torch.int32) for p in lp_packs.values()]))
        result = HandoffStep(host[:n_packed], step.num_req, step.num_pos).to_host()
        if draft_values is not None:
            self._settle(idx, drafts, host[n_packed:n_packed + n_drafts].tolist(), starts)
        lp_host, at = {}, n_packed + n_drafts
        for j, p in lp_packs.items():
            lp_host[j] = host[at:at + p.shape[0]].view(torch.float32)
            at += p.shape[0]
        accepted = result.num_accepted.tolist()
        emitted = result.emit_token.tolist()
        modes, runs = result.new_mode.tolist(), result.new_run.tolist()
        sources = result.accepted_source.tolist()
        for j, i in enumerate(idx):
            m = accepted[j]
            decisions[i] = Decision(m, None if emitted[j] == NO_TOKEN else emitted[j], modes[j], runs[j],
                                    sources[starts[j]:starts[j] + m], None)
            if i in failed:
                decisions[i] = failed[i]
            elif j in lp_host:
                d = decisions[i]
                tokens, srcs = _written(d, drafts[i])
                try:
                    d.logprobs = unpack(lp_host[j], len(drafts[i]), reqs[i].params.logprobs, tokens, srcs, m)
                except Exception as e:  # noqa: BLE001
                    decisions[i] = e

    @staticmethod
    def _pack_logprobs(idx, reqs, drafts, walk_rows, base_logits, draft_logits, draft_values, step):
        """{walk index: packed logprob candidates on the device} for the requests that asked, and
        {request index: exception} for those whose packing raised."""
        packs, failed = {}, {}
        for j, i in enumerate(idx):
            r = reqs[i]
            if r.logprobs is None:
                continue
            try:
                dev = base_logits.device
                values = (draft_values[i].to(dev) if draft_values is not None
                          else torch.tensor(drafts[i], dtype=torch.long, device=dev))
                emit = step.packed[step.num_req + j].long()
                packs[j] = pack_on_device(base_logits[walk_rows[i]], draft_logits[i], values, emit, r.params.logprobs)
                assert packs[j].shape[0] == packed_size(len(drafts[i]), r.params.logprobs)
            except Exception as e:  # noqa: BLE001
                packs.pop(j, None)
                failed[i] = e
        return packs, failed

    def _decide_sampled(self, idx, reqs, drafts, walk_rows, base_logits, draft_logits, decisions,
                        draft_values=None) -> None:
        """Rejection sampling per request on the host, on distributions computed for all of them
        at once; one host read brings the base rows, the drafts' rows and the drafts' values."""
        rows = torch.cat([torch.arange(walk_rows[i].start, walk_rows[i].stop) for i in idx])
        dev = base_logits.device
        base_rows = base_logits[rows.to(dev)]                                    # [rows, vocab]
        vocab = base_rows.shape[-1]
        flat_rows = [row.to(dev) for i in idx for row in draft_logits[i]]
        draft_rows = torch.stack(flat_rows) if flat_rows else base_rows.new_empty(0, vocab)  # [drafts, vocab]
        values = (torch.cat([draft_values[i].to(dev) for i in idx]) if draft_values is not None
                  else torch.empty(0, dtype=torch.long, device=dev))
        # Token ids ride as float32: exact below 2**24, far above any vocabulary.
        host = host_read(torch.cat([base_rows.float().flatten(), draft_rows.float().flatten(), values.float()]))
        logits = host[:base_rows.numel()].view(-1, vocab)
        draft_host = host[base_rows.numel():base_rows.numel() + draft_rows.numel()].view(-1, vocab)
        if draft_values is not None:
            flat_values = host[base_rows.numel() + draft_rows.numel():].long().tolist()
            self._settle(idx, drafts, flat_values, [sum(len(drafts[i]) for i in idx[:j]) for j in range(len(idx))])
        row_max, argmax, lse, _ = top1_stats_torch(logits)
        top1 = torch.exp(row_max - lse)                                          # raw: the handoff test
        base_probs = processed_probs(logits, [reqs[i].params for i in idx for _ in range(len(drafts[i]) + 1)])
        draft_probs = (processed_probs(draft_host, [reqs[i].nudger_params for i in idx for _ in draft_logits[i]])
                       if flat_rows else torch.empty(0, vocab))
        at, dat = 0, 0
        for i in idx:
            r, k = reqs[i], len(drafts[i])
            try:
                w = sampling_walk(drafts[i], top1[at:at + k + 1], argmax[at:at + k + 1], base_probs[at:at + k + 1],
                                  draft_probs[dat:dat + k], Mode(r.mode), r.run, r.gamma, r.resume_on_agreement,
                                  self.word_start_host, r.generator)
                d = decisions[i] = Decision(w.num_accepted, w.emit_token, int(w.mode), w.run, w.accepted_sources,
                                            None)
                if r.logprobs is not None:
                    tokens, srcs = _written(d, drafts[i])
                    d.logprobs = from_rows(logits[at:at + k + 1], draft_host[dat:dat + k], tokens, srcs,
                                           r.params.logprobs)
            except Exception as e:  # noqa: BLE001
                decisions[i] = e
            at, dat = at + k + 1, dat + k


def _written(d: Decision, drafts: list[int]) -> tuple[list[int], list[int]]:
    """The round's written tokens and their writers: accepted drafts, then the base's emitted token."""
    emitted = [d.emit_token] if d.emit_token is not None else []
    return drafts[:d.num_accepted] + emitted, list(d.accepted_sources[:d.num_accepted]) + [Source.BASE] * len(emitted)
