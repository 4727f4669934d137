from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .attention_metadata import AttentionMetadata


@dataclass
class ForwardContext:
    """What every layer of one forward reads: the step's plan, the backend, the model's KV cache."""

    meta: AttentionMetadata
    backend: Any             # TorchAttentionBackend or kernels.backend.TritonAttentionBackend
    kv_cache: torch.Tensor   # [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
