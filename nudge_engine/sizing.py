"""How many KV blocks each model's pool gets: one budget, the same number of blocks per model.

Both models hold the same output (and similar prompts), so equal token capacity per model
wastes nothing; the budget is split in proportion to each model's bytes per block.
"""
from __future__ import annotations

import torch

from .config import ModelConfig
from .model_runner import DEFAULT_CPU_KV_BYTES, DEFAULT_GPU_MEMORY_FRACTION, kv_bytes_per_block

ACTIVATION_BYTES_PER_TOKEN_PER_HIDDEN = 64  # generous: logits, MLP intermediates, attention scratch


def size_kv_pools(configs: list[ModelConfig], loaded, device: torch.device, dtype: torch.dtype, block_size: int,
                  kv_cache_bytes: int | None, max_num_batched_tokens: int) -> int:
    per_block = sum(kv_bytes_per_block(c, block_size, dtype) for c in configs)
    if kv_cache_bytes is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            activations = sum(max_num_batched_tokens * max(c.hidden_size, c.vocab_size // 8) *
                              ACTIVATION_BYTES_PER_TOKEN_PER_HIDDEN // 8 for c in configs)
            kv_cache_bytes = int(free * DEFAULT_GPU_MEMORY_FRACTION) - activations
        else:
            kv_cache_bytes = DEFAULT_CPU_KV_BYTES
    blocks = kv_cache_bytes // per_block
    if blocks < 1:
        raise ValueError(f"KV cache budget of {kv_cache_bytes} bytes holds no block ({per_block} bytes per block)")
    return int(blocks)
