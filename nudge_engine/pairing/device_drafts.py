"""The nudger's draft passes without a return to the host (the token path, pairing/token.py).

Each pass's drafts are picked on the device (argmax, or a sample with the request's generator:
the CPU one on the CPU, a device generator seeded alike on a GPU) and written into a device
matrix; the next pass takes them as its input ids on the device. The host sequences get a
PLACEHOLDER per draft, which is all the C++ batch builder needs for positions and slot mappings
(the scheduler reserved the lookahead slots); the walk's one host read brings the drafts' values,
and the C++ core's `settle_round` writes them over the placeholders (pairing/token.py).

Host work per pass is a few list operations over the drafting requests and one C++ call each for
the sequences' bookkeeping (`advance_computed`, `append_placeholders`): no per-request tensor, and
no nudger row is kept for requests whose walk does not need it (greedy without logprobs).
"""
from __future__ import annotations

import numpy as np
import torch

from .. import _core
from ..engine.sampler import processed_probs

PLACEHOLDER = 0   # a draft's token id in the host sequences until the walk's read gives its value


def check_core(failures: list, what: str) -> None:
    """A batched sequence update of the C++ core failed for some sequence: that is the engine's bug,
    not one request's (the updates follow what the scheduler reserved), so the round fails."""
    if failures:
        i, message = failures[0]
        raise RuntimeError(f"{what}: sequence {i}: {message}" + (f" (and {len(failures) - 1} more)"
                                                                 if len(failures) > 1 else ""))


def concat_ranges(starts, lens) -> np.ndarray:
    """[starts[0], starts[0] + lens[0]) ++ [starts[1], ...) ++ ...: [sum(lens)] int64."""
    starts = np.asarray(starts, dtype=np.int64)
    lens = np.asarray(lens, dtype=np.int64)
    total = int(lens.sum())
    return np.repeat(starts - (np.cumsum(lens) - lens), lens) + np.arange(total, dtype=np.int64)


def flat_index(rows: list[int], counts: list[int], width: int, end: int | None = None) -> np.ndarray:
    """Flat indices into a [num_rows, width (+1 with end)] matrix: row r's first counts[r] columns, then,
    with end, the column `width` (where the end marker sits). -> [sum(counts) (+ len(rows))] int64."""
    counts_np = np.asarray(counts, dtype=np.int64)
    lens = counts_np + (1 if end is not None else 0)
    stride = width + (1 if end is not None else 0)
    index = concat_ranges(np.asarray(rows, dtype=np.int64) * stride, lens)
    if end is not None:   # each row's last entry: its end column instead of column counts[r]
        last = np.cumsum(lens) - 1
        index[last] += width - counts_np
    return index


class RoundDrafts:
    """One round's drafts: counts (and placeholders) on the host, values on the device."""

    def __init__(self, num_reqs: int, max_k: int, device: torch.device):
        self.values = torch.zeros(num_reqs, max(max_k, 1), dtype=torch.long, device=device)  # [num_reqs, max_k]
        self.device = device

    def of(self, i: int, count: int) -> torch.Tensor:  # [count] int64 on the device
        return self.values[i, :count]

    def put(self, rows: list[int], column: int, tokens: torch.Tensor) -> None:
        """values[rows[n], column] = tokens[n]; tokens [len(rows)] int64 on the device."""
        if len(rows) == self.values.shape[0]:
            self.values[:, column] = tokens
        else:
            self.values[torch.tensor(rows, device=self.device), column] = tokens

    def flat(self, req_index: list[int], counts: list[int]) -> torch.Tensor:
        """The drafts of the given requests, concatenated: [sum(counts)] int64 on the device."""
        if not req_index or sum(counts) == 0:
            return torch.empty(0, dtype=torch.long, device=self.device)
        width = self.values.shape[1]
        if _whole(req_index, counts, self.values):
            return self.values.view(-1)
        index = torch.from_numpy(flat_index(req_index, counts, width)).to(self.device, non_blocking=True)
        return self.values.view(-1)[index]

    def flat_with_end(self, req_index: list[int], counts: list[int], end: int) -> torch.Tensor:
        """Each given request's drafts, then `end`, concatenated: [sum(counts) + len(req_index)] int64."""
        width = self.values.shape[1]
        padded = torch.cat([self.values, self.values.new_full((self.values.shape[0], 1), end)], 1)  # [N, width + 1]
        if _whole(req_index, counts, self.values):
            return padded.view(-1)
        index = torch.from_numpy(flat_index(req_index, counts, width, end)).to(self.device, non_blocking=True)
        return padded.view(-1)[index]


def _whole(req_index: list[int], counts: list[int], values: torch.Tensor) -> bool:
    """Whether the selection is every row of `values`, in order, each with all its columns."""
    n, width = values.shape
    return len(req_index) == n and req_index == list(range(n)) and all(c == width for c in counts)


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
        nudger row [vocab] of each draft, on the device, for the requests whose walk reads them
        (sampled ones, and those with logprobs; empty lists for the others); RoundDrafts with the
        values, or None)
    """
    logits: list[list[torch.Tensor]] = [[] for _ in reqs]
    if num_new is None:
        return [[] for _ in reqs], logits, None
    nudger, engine = pairing.nudger, pairing.engine
    failed = engine.failed
    device = nudger.runner.device
    values = RoundDrafts(len(reqs), max(k, default=0), device)
    made = [0] * len(reqs)
    rows_wanted = [not r.greedy or r.logprobs is not None for r in reqs]
    active = [i for i, n in enumerate(num_new) if n > 0 and (k[i] > 0 or not final[i])]
    step_new = [num_new[i] for i in active]
    previous = None   # [len(active)] int64: the last pass's drafts, this pass's inputs
    for j in range(max(k, default=0) + 1):
        if not active:
            break
        seqs = [reqs[i].nudger_seq for i in active]
        out = nudger.forward(seqs, step_new, override=None if previous is None else (None, previous))
        at = [p for p, i in enumerate(active) if made[i] < k[i]]   # positions in `active` that draft
        picks = [active[p] for p in at]
        rows = out if len(at) == len(active) else out[torch.tensor(at, dtype=torch.long, device=out.device)]
        tokens = pick_on_device(engine, [reqs[i] for i in picks], rows) if picks else None
        check_core(_core.advance_computed(seqs, step_new), "draft pass")
        if picks:
            values.put(picks, j, tokens)
        drafted = []
        for n, i in enumerate(picks):
            if reqs[i].id in failed:
                continue
            made[i] += 1
            drafted.append(i)
            if rows_wanted[i]:
                logits[i].append(rows[n])
        check_core(_core.append_placeholders([reqs[i].nudger_seq for i in drafted], [1] * len(drafted),
                                             PLACEHOLDER), "draft placeholders")
        going = {i for i in drafted if made[i] < k[i]}
        keep = [n for n, i in enumerate(picks) if i in going]
        active = [picks[n] for n in keep]
        previous = None if not keep else tokens if len(keep) == len(picks) else tokens[
            torch.tensor(keep, dtype=torch.long, device=tokens.device)]
        step_new = [1] * len(active)
        rest = _rest_in_one_graph(nudger, reqs, active, k, made)   # after any pass: a mixed round fuses its tail
        if rest:
            _draft_rest(nudger, reqs, active, rest, made, values, previous)
            break
    return [[PLACEHOLDER] * m for m in made], logits, values


def _rest_in_one_graph(nudger, reqs: list, active: list[int], k: list[int], made: list[int]) -> int:
    """The further passes the drafting requests all still need, when they can run as one captured
    graph (model/draft_graph.py); else 0. Only greedy requests without logprobs: their walk needs the
    drafts' values alone, not the nudger's rows (which the graph does not keep)."""
    graphs = getattr(nudger, "draft_graphs", None)
    if graphs is None or not active:
        return 0
    rest = {k[i] - made[i] for i in active}
    if len(rest) != 1 or not graphs.fits(len(active), next(iter(rest)), 0):
        return 0
    if any(not reqs[i].greedy or reqs[i].logprobs is not None for i in active):
        return 0
    return rest.pop()


def _draft_rest(nudger, reqs: list, active: list[int], rest: int, made: list[int], values: RoundDrafts,
                first: torch.Tensor) -> None:   # first: [len(active)] int64, the first pass's drafts
    """Passes 2..k of every active request in one replay; the host gets placeholders as in the loop."""
    seqs = [reqs[i].nudger_seq for i in active]
    check_core(_core.append_placeholders(seqs, [rest] * len(seqs), PLACEHOLDER), "draft placeholders")
    batch = _core.build_batch(seqs, [rest] * len(seqs), nudger.runner.block_size)
    out = nudger.draft_graphs.run(batch, first, rest)            # [rest, len(active)]
    done = made[active[0]]   # the same for all: every active request drafted in every pass so far
    index = slice(None) if len(active) == values.values.shape[0] else torch.tensor(active, device=values.device)
    values.values[index, done:done + rest] = out.t().to(values.device)
    check_core(_core.advance_computed(seqs, [rest] * len(seqs)), "draft graph")
    for i in active:
        made[i] += rest
