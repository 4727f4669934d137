"""The nudger's draft passes without a return to the host (the token path, pairing/token.py).

Each pass's drafts are picked on the device (argmax, or a sample with the request's generator:
the CPU one on the CPU, a device generator seeded alike on a GPU) and written into a device
matrix; the next pass takes them as its input ids on the device. The host sequences get a
PLACEHOLDER per draft, which is all the C++ batch builder needs for positions and slot mappings
(the scheduler reserved the lookahead slots); the walk's one host read brings the drafts' values,
and `settle` writes them over the placeholders.
"""
from __future__ import annotations

import torch

from .. import _core
from ..engine.sampler import processed_probs

PLACEHOLDER = 0   # a draft's token id in the host sequences until the walk's read gives its value


class RoundDrafts:
    """One round's drafts: counts (and placeholders) on the host, values on the device."""

    def __init__(self, num_reqs: int, max_k: int, device: torch.device):
        self.values = torch.zeros(num_reqs, max(max_k, 1), dtype=torch.long, device=device)  # [num_reqs, max_k]
        self.device = device

    def of(self, i: int, count: int) -> torch.Tensor:  # [count] int64 on the device
        return self.values[i, :count]

    def flat(self, req_index: list[int], counts: list[int]) -> torch.Tensor:
        """The drafts of the given requests, concatenated: [sum(counts)] int64 on the device."""
        rows = [i for i, c in zip(req_index, counts) for _ in range(c)]
        cols = [j for c in counts for j in range(c)]
        if not rows:
            return torch.empty(0, dtype=torch.long, device=self.device)
        return self.values[torch.tensor(rows, device=self.device), torch.tensor(cols, device=self.device)]


def device_generator(req, device: torch.device) -> torch.Generator:
    """The request's generator on the draft's device: its own (CPU) one on the CPU; on a GPU one
    seeded from it, kept on the request (drafts sampled there follow the GPU's random stream)."""
    if device.type == "cpu":
        return req.generator
    gen = getattr(req, "device_generator", None)
    if gen is None:
        gen = torch.Generator(device=device)
        gen.manual_seed(req.generator.initial_seed())
        req.device_generator = gen
    return gen


def _sample(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:  # [1] int64
    """sampler.draw without its int(): the same draw, left on the device."""
    return torch.multinomial(probs, 1, generator=generator)


def pick_on_device(engine, reqs: list, rows: torch.Tensor) -> torch.Tensor:
    """rows [n, vocab] raw nudger logits -> [n] int64 draft tokens, without leaving the device.
    A request whose draw raises is marked failed (engine.guard); its entry is then meaningless."""
    tokens = rows.argmax(-1)
    sampled = [j for j, r in enumerate(reqs) if not r.nudger_params.greedy]
    if sampled:
        probs = processed_probs(rows[sampled], [reqs[j].nudger_params for j in sampled])
        for j, p in zip(sampled, probs):
            tok = engine.guard(reqs[j], _sample, p, device_generator(reqs[j], rows.device))
            if isinstance(tok, torch.Tensor):
                tokens[j] = tok[0]
    return tokens


def draft_on_device(pairing, reqs: list, num_new: list[int] | None, k: list[int], final: list[bool]):
    """Nudger passes: catch-up + first draft, then one draft token per pass; where the requests that
    go on drafting all need the same number of further passes (greedy, no logprobs), those run as one
    captured graph (model/draft_graph.py) and keep no logits rows.

    A request that does not draft this round computes nothing in the nudger (lazy catch-up),
    except prefill chunks, which always keep the newest token pending.
    -> (drafts: per request a list of PLACEHOLDERs, one per draft; logits: per request the raw
        nudger row [vocab] of each draft, on the device; RoundDrafts with the values, or None)
    """
    drafts: list[list[int]] = [[] for _ in reqs]
    logits: list[list[torch.Tensor]] = [[] for _ in reqs]
    if num_new is None:
        return drafts, logits, None
    nudger, engine = pairing.nudger, pairing.engine
    device = nudger.runner.device
    values = RoundDrafts(len(reqs), max(k, default=0), device)
    active = [i for i, n in enumerate(num_new) if n > 0 and (k[i] > 0 or not final[i])]
    step_new = {i: num_new[i] for i in active}
    previous = None   # [len(active)] int64: the last pass's drafts, this pass's inputs
    for j in range(max(k, default=0) + 1):
        if not active:
            break
        seqs = [reqs[i].nudger_seq for i in active]
        out = nudger.forward(seqs, [step_new[i] for i in active], override=None if previous is None else (None, previous))
        picks = [i for i in active if len(drafts[i]) < k[i]]
        rows = out[[active.index(i) for i in picks]] if picks else out[:0]   # [len(picks), vocab]
        tokens = pick_on_device(engine, [reqs[i] for i in picks], rows) if picks else None
        for i in active:
            seq = reqs[i].nudger_seq
            seq.set_num_computed(seq.num_computed + step_new[i])
        if picks:
            values.values[torch.tensor(picks, device=device), j] = tokens
        for n, i in enumerate(picks):
            if reqs[i].id in engine.failed:
                continue
            drafts[i].append(PLACEHOLDER)
            logits[i].append(rows[n])
            reqs[i].nudger_seq.append_provisional([PLACEHOLDER])
        active = [i for i in picks if len(drafts[i]) < k[i] and reqs[i].id not in engine.failed]
        previous = tokens[[picks.index(i) for i in active]] if active else None
        step_new = {i: 1 for i in active}
        rest = _rest_in_one_graph(nudger, reqs, active, k, drafts)   # after any pass: a mixed round fuses its tail
        if rest:
            _draft_rest(nudger, reqs, active, rest, drafts, values, previous)
            break
    return drafts, logits, values


def _rest_in_one_graph(nudger, reqs: list, active: list[int], k: list[int], drafts: list[list[int]]) -> int:
    """The further passes the drafting requests all still need, when they can run as one captured
    graph (model/draft_graph.py); else 0. Only greedy requests without logprobs: their walk needs the
    drafts' values alone, not the nudger's rows (which the graph does not keep)."""
    graphs = getattr(nudger, "draft_graphs", None)
    if graphs is None or not active:
        return 0
    rest = {k[i] - len(drafts[i]) for i in active}
    if len(rest) != 1 or not graphs.fits(len(active), next(iter(rest)), 0):
        return 0
    if any(not reqs[i].greedy or reqs[i].logprobs is not None for i in active):
        return 0
    return rest.pop()


def _draft_rest(nudger, reqs: list, active: list[int], rest: int, drafts: list[list[int]], values: RoundDrafts,
                first: torch.Tensor) -> None:   # first: [len(active)] int64, the first pass's drafts
    """Passes 2..k of every active request in one replay; the host gets placeholders as in the loop."""
    seqs = [reqs[i].nudger_seq for i in active]
    for seq in seqs:
        seq.append_provisional([PLACEHOLDER] * rest)
    batch = _core.build_batch(seqs, [rest] * len(seqs), nudger.runner.block_size)
    out = nudger.draft_graphs.run(batch, first, rest)            # [rest, len(active)]
    done = len(drafts[active[0]])   # the same for all: every active request drafted in every pass so far
    values.values[torch.tensor(active, device=values.device), done:done + rest] = out.t().to(values.device)
    for i, seq in zip(active, seqs):
        seq.set_num_computed(seq.num_computed + rest)
        drafts[i].extend([PLACEHOLDER] * rest)


def settle(seq, drafts: list[int]) -> None:
    """Writes the drafts' values (known after the walk) over their placeholders: the sequence
    ends with those drafts now (before the round's rollback)."""
    if drafts:
        seq.overwrite(seq.num_tokens - len(drafts), drafts)
