"""Sampling on the text path (NUDGING.md sections 5 and 7): which token each model writes, from
whose random numbers, and why the result is exact and seed-reproducible.

Each model samples its own tokens from its own processed distribution (temperature, top-p, top-k,
min-p: the request's settings for the base, the nudger_* twins for the nudger); a greedy model
takes the argmax and draws nothing. The uncertainty test (top1 < gamma) and the agreement test
read the base's RAW distribution; at a NUDGE-to-BASE handoff the base samples a fresh token from
its processed p'.

Exactness, for every draft_tokens and with adaptive drafting:
  - BASE mode: at every verified row the base's token is a draw from p' at that row, whose
    context equals the sequential one because every earlier row's token matched its draft (else
    the round ended there). The nudger's drafts (its argmax, converted to base tokens) only decide
    how many rows a round covers, never which token is written: speculation by exact match, not
    section 5's rejection sampling (min(1, p'(d)/q(d)) needs both distributions over one
    vocabulary, which the text conversion does not give). A draft passes with probability p'(d)
    instead of sum(min(p', q)): lower, but exact. A row with top1 < gamma switches to NUDGE and the
    drafts after it are dropped (they were never the nudger's text).
  - NUDGE mode: the queued tokens are the nudger's own sequential samples from q; a token is
    written iff the base does not take over before it, which depends only on the text before it
    and, with agreement, on the nudger's next word, i.e. what the sequential nudger writes next.
    Tokens queued after a takeover are dropped.
Random numbers: the base draws from its own generator (seeded with the request's seed), exactly
one draw per token it writes, so its stream never depends on drafting. The nudger's generator is
reseeded at the start of every nudge run from (seed, run index): the j-th token of a run is always
the run's j-th draw, whatever was drafted ahead and dropped, and a new run never reuses a number
the old run's handoff decision saw. So a seed fixes the text whatever the batch, draft_tokens or
adaptive drafting, and the text's distribution is the sequential one of section 7
(tests/test_cross_sampling.py tests both, with a slow reference and a chi-square test).
"""
from __future__ import annotations

import torch

from .host_read import host_read
from ..engine.sampler import draw, processed_probs

SEED_MOD = 2**63
# Run r of a request seeded s draws from seed s + r * STRIDE: an odd step near 2^63 / golden
# ratio, so the run seeds of small request seeds (0, 1, 2, ...) never meet each other's.
NUDGE_RUN_SEED_STRIDE = 0x9E3779B97F4A7C15


def start_nudge_run(req) -> None:
    """The switch to NUDGE: the nudger's draws for this run start afresh from (seed, run index)."""
    req.nudge_runs += 1
    req.nudger_gen.manual_seed((req.seed + req.nudge_runs * NUDGE_RUN_SEED_STRIDE) % SEED_MOD)


def base_token(req, row: torch.Tensor, argmax: int) -> int:
    """The token the base writes at a row (logits [vocab]): its raw argmax when greedy, else one
    draw from its processed distribution with its own generator."""
    if req.params.greedy:
        return argmax
    return draw(processed_probs(host_read(row[None].float()), [req.params])[0], req.base_gen)


def nudger_tokens(reqs: list, rows: torch.Tensor, writing: list[bool]) -> list[int]:
    """rows [n, vocab] nudger logits -> one token each: a draw from q where the request's nudger
    writes (NUDGE mode) and samples, else the argmax (a greedy nudger, or a BASE-mode draft)."""
    tokens = host_read(rows.argmax(-1)).tolist()
    sampled = [j for j, (r, w) in enumerate(zip(reqs, writing)) if w and not r.nudger_params.greedy]
    if sampled:
        probs = processed_probs(host_read(rows[sampled].float()), [reqs[j].nudger_params for j in sampled])
        for j, p in zip(sampled, probs):
            tokens[j] = draw(p, reqs[j].nudger_gen)
    return tokens
