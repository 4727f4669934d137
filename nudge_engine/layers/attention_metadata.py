"""Per-step attention plan: built once per forward, read by every layer (FlashInfer style)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

NO_SLOT = -1   # slot_mapping entry of a token whose K/V must not be stored
NO_BLOCK = -1  # block_tables padding


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor     # [num_tokens] int64, NO_SLOT = skip
    block_tables: torch.Tensor     # [num_seqs, max_blocks] int32, NO_BLOCK padded
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32, cumulative new-token counts
    seq_lens: torch.Tensor         # [num_seqs] int32, context length including the new tokens
    max_query_len: int
    max_seq_len: int
    block_size: int
    plan: dict = field(default_factory=dict)  # backend-specific tensors derived once per step

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]
