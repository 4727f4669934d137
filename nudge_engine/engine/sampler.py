"""Processed distributions (temperature, top-k, top-p, min-p), batched with per-row settings,
and seeded per-request draws."""
from __future__ import annotations

from typing import Sequence

import torch

from .sampling_params import SamplingParams


def processed_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """logits [n, vocab] float32, one SamplingParams per row -> probabilities [n, vocab].

    Greedy rows are the one-hot distribution at the argmax, so rejection sampling treats greedy
    and sampled models alike. Top-p applies to the top-k-filtered, renormalized distribution.
    Every row is a finite distribution whatever the settings: the top token always survives the
    filters (a top-p so small it keeps nothing keeps it), and a row that still is not finite
    (logits with NaN, a temperature whose float32 form overflows) becomes one-hot at its argmax.
    """
    n, vocab = logits.shape
    dev = logits.device
    temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=dev)
    greedy = temperature == 0
    probs = torch.softmax(logits.float() / torch.where(greedy, 1.0, temperature)[:, None], dim=-1)
    top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=dev)
    top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=dev)
    min_p = torch.tensor([p.min_p for p in params], dtype=torch.float32, device=dev)
    # Decided from the settings on the host: a branch on device values would sync the device.
    if any(0 < p.top_k < vocab or p.top_p < 1 or p.min_p > 0 for p in params):
        ordered, order = probs.sort(dim=-1, descending=True)
        keep = torch.arange(vocab, device=dev)[None, :] < top_k[:, None]
        ordered = torch.where(keep, ordered, 0.0)
        mass_above = ordered.cumsum(-1) - ordered
        keep &= mass_above < top_p[:, None] * ordered.sum(-1, keepdim=True)
        keep &= ordered >= min_p[:, None] * ordered[:, :1]
        keep[:, 0] = True
        probs = torch.zeros_like(probs).scatter_(-1, order, torch.where(keep, ordered, 0.0))
        probs = probs / probs.sum(-1, keepdim=True)
    total = probs.sum(-1)
    one_hot_rows = greedy | ~torch.isfinite(total) | (total <= 0)
    one_hot = torch.nn.functional.one_hot(logits.argmax(-1), vocab).to(probs.dtype)  # always: no sync
    return torch.where(one_hot_rows[:, None], one_hot, probs)


SEED_BOUND = 2**62   # seeds drawn for requests without one


def request_generator(seed: int | None, engine_gen: torch.Generator) -> tuple[int, torch.Generator]:
    """A request's own generator: its seed, or one drawn from the engine's, so that a seeded request
    draws the same numbers whatever it is batched with. -> (seed used, generator)."""
    if seed is None:
        seed = int(torch.randint(SEED_BOUND, (), generator=engine_gen))
    return seed, torch.Generator().manual_seed(seed)


def draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One token from probs [vocab] (need not be normalized) with the request's own generator."""
    return int(torch.multinomial(probs, 1, generator=generator))


def uniform(generator: torch.Generator) -> float:
    return float(torch.rand((), generator=generator))
