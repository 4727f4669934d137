"""Processed distributions (temperature, top-k, top-p, min-p) and seeded per-request draws."""
from __future__ import annotations

import torch

from .sampling_params import SamplingParams


def processed_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits [n, vocab] float32 -> probabilities [n, vocab] after the request's transforms.

    Greedy is the one-hot distribution at the argmax, so rejection sampling treats greedy and
    sampled models alike.
    """
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = probs.topk(params.top_k, dim=-1).values[..., -1:]
        probs = torch.where(probs >= kth, probs, 0.0)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass strictly above each token
        keep_sorted = before < params.top_p * sorted_probs.sum(-1, keepdim=True)
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        probs = torch.where(keep, probs, 0.0)
    if params.min_p > 0.0:
        probs = torch.where(probs >= params.min_p * probs.amax(-1, keepdim=True), probs, 0.0)
    return probs / probs.sum(-1, keepdim=True)


def draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One token from probs [vocab] (need not be normalized) with the request's own generator."""
    return int(torch.multinomial(probs, 1, generator=generator))


def uniform(generator: torch.Generator) -> float:
    return float(torch.rand((), generator=generator))
