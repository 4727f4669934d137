"""Vocabulary-parallel embedding (and LM head weight): each rank holds an even, padded share of the rows.

The vocabulary is padded up to a multiple of the ranks so every rank's share, and so every gathered
logits piece, has the same size; the padding rows are zeros and their logits columns are cut off.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from .parallel import TensorParallel, set_checkpoint_slice


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden: int, tp: TensorParallel):
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.per_rank = -(-vocab_size // tp.size)
        self.start = tp.rank * self.per_rank
        self.rows = max(0, min(self.per_rank, vocab_size - self.start))   # real (unpadded) rows here
        self.weight = nn.Parameter(torch.empty(self.per_rank, hidden))     # [vocab / tp (padded), hidden]
        set_checkpoint_slice(self.weight, None, 0, self.start, self.rows, vocab_size)
        self.weight.weight_loader = self._load

    def _load(self, param: nn.Parameter, loaded: torch.Tensor, shard: str | None) -> None:
        param.data[: self.rows].copy_(loaded)   # loaded: [rows, hidden], this rank's slice
        param.data[self.rows:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [num_tokens] -> [num_tokens, hidden]
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.rows)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside[:, None], 0.0)
        return self.tp.all_reduce(out)   # each token's row comes from the one rank that holds it

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [n, hidden] -> [n, vocab], every rank
        local = hidden @ self.weight.t()                     # [n, vocab / tp (padded)]
        return self.tp.all_gather_last(local)[:, : self.vocab_size]
