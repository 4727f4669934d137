"""Decides every final request of a round: the fused greedy walk for all greedy requests at once,
rejection sampling on the host for requests where a model samples.

Where the greedy walk runs: the Triton kernel (kernels/handoff_step.py) with the Triton backend
(CUDA, or interpreted in tests); the C++ core's walk (csrc/handoff_walk.cpp, after the top-1
statistics in torch) in the CPU engine; handoff_torch.py is the reference both must equal."""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from .. import _core
from .handoff_torch import NO_TOKEN, HandoffStep, handoff_step_torch, top1_stats_torch
from ..engine.request import Mode, Request, Source
from ..engine.sampler import processed_probs
from .host_read import host_read
from .sampling_walk import sampling_walk
from .walk_logprobs import from_rows, pack_on_device, packed_size, unpack


@dataclass(slots=True)
class Decision:
    num_accepted: int
    emit_token: int | None
    mode: int
    run: int
    accepted_sources: list[int]
    logprobs: list[dict[int, float]] | None   # per decided token, when the request asked


@dataclass(slots=True)
class WalkResult:
    """The greedy walk's result on the host, per walked request j (and per position for sources)."""
    num_accepted: list[int]
    emit_token: list[int]       # NO_TOKEN: none
    new_mode: list[int]
    new_run: list[int]
    accepted_source: list[int]  # [positions]
    draft_values: list[int]     # [positions]: each request's drafts then NO_TOKEN (the flat walk input)


class Handoff:
    def __init__(self, device: torch.device, word_start: torch.Tensor, use_triton: bool):
        self.device = device
        self.word_start_host = word_start                  # [vocab] bool
        self.word_start = word_start.to(device)            # [vocab] bool
        self._word_start_u8 = word_start.to(torch.uint8).numpy()   # [vocab] uint8, the C++ walk's table
        self._step = handoff_step_torch
        self._walk_bound = True   # the torch walk takes its loop bound from the host (no device read)
        self._host_walk = device.type == "cpu" and not use_triton   # the CPU engine: the C++ core walks
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
        values=None,                         # RoundDrafts (pairing/device_drafts.py): the drafts' values
        value_rows: list[int] | None = None,  # each request's row in `values`
    ) -> list[Decision | Exception]:
        """One Decision per request, or the exception that ended that request's own part of the walk
        (its sampling walk or its logprobs): a request's failure is not the others'. Logprobs ride
        in the walk's read (pairing/walk_logprobs.py).

        With `values` the drafts' values live on the device (pairing/device_drafts.py) and `drafts`
        holds placeholders: the walk's one host read brings the values, written into `drafts` in place."""
        decisions: list[Decision | Exception | None] = [None] * len(reqs)
        greedy = [i for i, r in enumerate(reqs) if r.greedy]
        if greedy:
            self._decide_greedy(greedy, reqs, drafts, walk_rows, base_logits, decisions, draft_logits, values,
                                value_rows)
        if len(greedy) < len(reqs):
            sampled = [i for i, r in enumerate(reqs) if not r.greedy]
            self._decide_sampled(sampled, reqs, drafts, walk_rows, base_logits, draft_logits, decisions,
                                 values, value_rows)
        return decisions

    def _flat_drafts(self, idx, drafts, values, value_rows) -> tuple[torch.Tensor, list[int]]:
        """Each request's drafts then NO_TOKEN, concatenated: ([P] int64 on the device, starts [R + 1])."""
        counts = [len(drafts[i]) for i in idx]
        starts = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(np.asarray(counts, dtype=np.int64) + 1, out=starts[1:])
        if values is None:
            host = [t for i in idx for t in drafts[i] + [NO_TOKEN]]
            return torch.tensor(host, dtype=torch.int64, device=self.device), starts.tolist()
        flat = values.flat_with_end([value_rows[i] for i in idx], counts, NO_TOKEN)
        return flat.to(self.device), starts.tolist()

    @staticmethod
    def _settle(idx, drafts, flat: list[int], starts: list[int]) -> None:
        for j, i in enumerate(idx):
            if drafts[i]:
                drafts[i][:] = flat[starts[j]:starts[j] + len(drafts[i])]

    @staticmethod
    def _walk_logits(idx, walk_rows, base_logits, starts) -> torch.Tensor:
        """The walked requests' rows of base_logits ([P, vocab]); no gather when they are all of it, in order."""
        firsts = [walk_rows[i].start for i in idx]
        if firsts == starts[:-1] and base_logits.shape[0] == starts[-1]:
            return base_logits
        counts = np.diff(np.asarray(starts, dtype=np.int64))
        rows = np.repeat(np.asarray(firsts, dtype=np.int64) - np.asarray(starts[:-1], dtype=np.int64), counts) \
            + np.arange(starts[-1], dtype=np.int64)
        return base_logits[torch.from_numpy(rows).to(base_logits.device)]

    def _decide_greedy(self, idx, reqs, drafts, walk_rows, base_logits, decisions, draft_logits,
                       values=None, value_rows=None) -> None:
        if all(not drafts[i] and reqs[i].gamma <= 0 and reqs[i].logprobs is None for i in idx):
            # No drafts and a base that always writes (top1 >= 0): the walk is the argmax.
            rows = [walk_rows[i].start for i in idx]
            logits = base_logits if rows == list(range(base_logits.shape[0])) else base_logits[
                torch.tensor(rows, device=base_logits.device)]
            for i, tok in zip(idx, host_read(logits.argmax(-1)).tolist()):
                r = reqs[i]
                decisions[i] = Decision(0, tok, int(r.mode), r.run, [], None)
            return
        flat_drafts, starts = self._flat_drafts(idx, drafts, values, value_rows)
        logits = self._walk_logits(idx, walk_rows, base_logits, starts)
        state = ([int(reqs[i].mode) for i in idx], [reqs[i].run for i in idx], [reqs[i].gamma for i in idx],
                 [reqs[i].resume_on_agreement for i in idx])
        if self._host_walk:
            walk, lp_host, failed = self._walk_on_host(idx, reqs, drafts, logits, flat_drafts, starts, state,
                                                       draft_logits)
        else:
            walk, lp_host, failed = self._walk_on_device(idx, reqs, drafts, logits, flat_drafts, starts, state,
                                                         draft_logits)
        if values is not None:
            self._settle(idx, drafts, walk.draft_values, starts)
        sources = walk.accepted_source
        for j, i in enumerate(idx):
            m, emit = walk.num_accepted[j], walk.emit_token[j]
            decisions[i] = Decision(m, None if emit == NO_TOKEN else emit, walk.new_mode[j], walk.new_run[j],
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

    def _walk_on_device(self, idx, reqs, drafts, logits, flat_drafts, starts, state, draft_logits):
        """Stats + walk in one device step (the Triton kernel, or the torch reference), then the round's one
        small device-to-host copy: the walk's packed result, the drafts' values and the logprobs asked for."""
        dev = self.device
        mode, run, gamma, roa = state
        step = self._step(
            logits,
            flat_drafts,
            torch.tensor(starts, dtype=torch.int32, device=dev),
            torch.tensor(mode, dtype=torch.int32, device=dev),
            torch.tensor(run, dtype=torch.int32, device=dev),
            torch.tensor(gamma, dtype=torch.float32, device=dev),
            torch.tensor(roa, dtype=torch.bool, device=dev),
            self.word_start,
            **({"max_len": max(b - a for a, b in zip(starts, starts[1:]))} if self._walk_bound else {}),
        )
        lp_packs, failed = self._pack_logprobs(idx, reqs, drafts, logits, starts, draft_logits, flat_drafts,
                                               lambda j: step.packed[step.num_req + j].long())
        n_packed, n_drafts = step.packed.shape[0], flat_drafts.shape[0]
        host = host_read(torch.cat([step.packed, flat_drafts.to(torch.int32)]
                                   + [p.view(torch.int32) for p in lp_packs.values()]))
        result = HandoffStep(host[:n_packed], step.num_req, step.num_pos).to_host()
        lp_host, at = {}, n_packed + n_drafts
        for j, p in lp_packs.items():
            lp_host[j] = host[at:at + p.shape[0]].view(torch.float32)
            at += p.shape[0]
        walk = WalkResult(result.num_accepted.tolist(), result.emit_token.tolist(), result.new_mode.tolist(),
                          result.new_run.tolist(), result.accepted_source.tolist(),
                          host[n_packed:n_packed + n_drafts].tolist())
        return walk, lp_host, failed

    def _walk_on_host(self, idx, reqs, drafts, logits, flat_drafts, starts, state, draft_logits):
        """The CPU engine: the top-1 statistics in torch (as the reference computes them), one read of
        them and of the drafts' values, then the walk in the C++ core. Logprobs are packed from the
        walk's emitted tokens, now known, as the device path packs them (walk_logprobs.py)."""
        row_max, argmax, lse, _ = top1_stats_torch(logits)
        top1 = torch.exp(row_max - lse)
        n = argmax.shape[0]
        host = host_read(torch.cat([argmax.to(torch.int32), top1.view(torch.int32),
                                    flat_drafts.to(torch.int32)])).numpy()
        mode, run, gamma, roa = state
        acc, emit, new_mode, new_run, source = _core.handoff_walk(
            host[:n], host[n:2 * n].view(np.float32), host[2 * n:], np.asarray(starts, dtype=np.int32),
            np.asarray(mode, dtype=np.int32), np.asarray(run, dtype=np.int32), np.asarray(gamma, dtype=np.float32),
            np.asarray(roa, dtype=np.uint8), self._word_start_u8)
        walk = WalkResult(acc.tolist(), emit.tolist(), new_mode.tolist(), new_run.tolist(), source.tolist(),
                          host[2 * n:].tolist())
        lp_packs, failed = self._pack_logprobs(idx, reqs, drafts, logits, starts, draft_logits, flat_drafts,
                                               lambda j: torch.tensor(walk.emit_token[j]))
        return walk, {j: p.float() for j, p in lp_packs.items()}, failed

    @staticmethod
    def _pack_logprobs(idx, reqs, drafts, logits, starts, draft_logits, flat_drafts, emit_of):
        """{walk index: packed logprob candidates} for the requests that asked, and {request index:
        exception} for those whose packing raised. logits: the walk's rows; emit_of(j): the emitted
        token of walked request j ([] int64)."""
        packs, failed = {}, {}
        for j, i in enumerate(idx):
            r = reqs[i]
            if r.logprobs is None:
                continue
            try:
                k = len(drafts[i])
                rows = logits[starts[j]:starts[j + 1]]
                values = flat_drafts[starts[j]:starts[j] + k].to(rows.device)
                packs[j] = pack_on_device(rows, draft_logits[i], values, emit_of(j), r.params.logprobs)
                assert packs[j].shape[0] == packed_size(k, r.params.logprobs)
            except Exception as e:  # noqa: BLE001
                packs.pop(j, None)
                failed[i] = e
        return packs, failed

    def _decide_sampled(self, idx, reqs, drafts, walk_rows, base_logits, draft_logits, decisions,
                        values=None, value_rows=None) -> None:
        """Rejection sampling per request on the host, on distributions computed for all of them
        at once; one host read brings the base rows, the drafts' rows and the drafts' values."""
        rows = torch.cat([torch.arange(walk_rows[i].start, walk_rows[i].stop) for i in idx])
        dev = base_logits.device
        base_rows = base_logits[rows.to(dev)]                                    # [rows, vocab]
        vocab = base_rows.shape[-1]
        flat_rows = [row.to(dev) for i in idx for row in draft_logits[i]]
        draft_rows = torch.stack(flat_rows) if flat_rows else base_rows.new_empty(0, vocab)  # [drafts, vocab]
        flat_values = (values.flat([value_rows[i] for i in idx], [len(drafts[i]) for i in idx]).to(dev)
                       if values is not None else torch.empty(0, dtype=torch.long, device=dev))
        # Token ids ride as float32: exact below 2**24, far above any vocabulary.
        host = host_read(torch.cat([base_rows.float().flatten(), draft_rows.float().flatten(), flat_values.float()]))
        logits = host[:base_rows.numel()].view(-1, vocab)
        draft_host = host[base_rows.numel():base_rows.numel() + draft_rows.numel()].view(-1, vocab)
        if values is not None:
            flat = host[base_rows.numel() + draft_rows.numel():].long().tolist()
            self._settle(idx, drafts, flat, [0, *itertools.accumulate(len(drafts[i]) for i in idx)])
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
