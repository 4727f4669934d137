"""Log-probabilities of a round's written tokens, each under the model that wrote it (raw logits,
temperature 1): the written token's value first, then the writer's top-n.

The greedy walk decides on the device, so these are computed there too, for every token the round
could write (each draft under the base and under the nudger, the emitted token under every base
row), and ride in the walk's one host read (pairing/handoff.py); the host then picks the rows the
walk chose (`unpack`). The sampled walk already reads its rows to the host, so its logprobs come
from those copies (`from_rows`) without a read of their own.
"""
from __future__ import annotations

import torch

from ..engine.request import Source


def pack_on_device(base_rows: torch.Tensor,        # [k + 1, vocab] the base's walk rows of one request
                   draft_rows: list[torch.Tensor],  # k x [vocab] the nudger's rows of its drafts
                   drafts: torch.Tensor,            # [k] int64 the drafts' values, on the device
                   emit: torch.Tensor,              # [] int64 the walk's emitted token (< 0: none)
                   top_n: int) -> torch.Tensor:     # [packed_size(k, top_n)] float32
    """Base lp of each draft, base lp of the emitted token at every row, the base rows' top-n
    (values, ids); nudger lp of each draft and its rows' top-n (values, ids). Token ids ride as
    float32, exact below 2**24, far above any vocabulary."""
    k = drafts.shape[0]
    pick = torch.arange(k, device=base_rows.device)
    base = torch.log_softmax(base_rows.float(), dim=-1)                                 # [k + 1, vocab]
    pieces = [base[pick, drafts], base[:, emit.clamp(min=0)]]
    if top_n > 0:
        vals, ids = base.topk(top_n, dim=-1)
        pieces += [vals.flatten(), ids.float().flatten()]
    if k:
        nudger = torch.log_softmax(torch.stack(draft_rows).to(base.device).float(), dim=-1)  # [k, vocab]
        pieces.append(nudger[pick, drafts])
        if top_n > 0:
            vals, ids = nudger.topk(top_n, dim=-1)
            pieces += [vals.flatten(), ids.float().flatten()]
    return torch.cat(pieces)


def packed_size(k: int, top_n: int) -> int:
    return k + (k + 1) * (1 + 2 * top_n) + k * (1 + 2 * top_n)


def unpack(host: torch.Tensor,   # [packed_size(k, top_n)] float32, pack_on_device's values
           k: int, top_n: int, tokens: list[int], sources: list[int], num_accepted: int) -> list[dict[int, float]]:
    """tokens / sources: what the round wrote (num_accepted drafts, then the base's emitted token)."""
    sizes = [k, k + 1, (k + 1) * top_n, (k + 1) * top_n, k, k * top_n, k * top_n]
    parts = torch.split(host, sizes)
    base_draft, base_emit = parts[0].tolist(), parts[1].tolist()
    top = {Source.BASE: (parts[2].view(k + 1, top_n).tolist(), parts[3].view(k + 1, top_n).long().tolist()),
           Source.NUDGER: (parts[5].view(k, top_n).tolist(), parts[6].view(k, top_n).long().tolist())}
    nudger_draft = parts[4].tolist()
    out = []
    for pos, (tok, src) in enumerate(zip(tokens, sources)):
        if src == Source.NUDGER:
            value = nudger_draft[pos]
        else:
            value = base_draft[pos] if pos < num_accepted else base_emit[pos]
        out.append(_entry(tok, value, *(t[pos] for t in top[src]), top_n))
    return out


def from_rows(base_rows: torch.Tensor,   # [k + 1, vocab] on the host
              draft_rows: torch.Tensor,  # [k, vocab] on the host
              tokens: list[int], sources: list[int], top_n: int) -> list[dict[int, float]]:
    base = torch.log_softmax(base_rows.float(), dim=-1)
    nudger = torch.log_softmax(draft_rows.float(), dim=-1) if draft_rows.shape[0] else None
    out = []
    for pos, (tok, src) in enumerate(zip(tokens, sources)):
        lp = nudger[pos] if src == Source.NUDGER else base[pos]
        vals, ids = lp.topk(top_n) if top_n > 0 else (lp[:0], lp[:0].long())
        out.append(_entry(tok, float(lp[tok]), vals.tolist(), ids.tolist(), top_n))
    return out


def _entry(tok: int, value: float, top_vals: list[float], top_ids: list[int], top_n: int) -> dict[int, float]:
    entry = {int(tok): value}
    for v, t in zip(top_vals[:top_n], top_ids[:top_n]):
        entry.setdefault(int(t), v)
    return entry
