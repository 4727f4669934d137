"""TritonAttentionBackend: the CUDA attention backend (same interface as TorchAttentionBackend)."""
from __future__ import annotations

import torch

from .paged_attention import paged_attention
from .store_kv import store_kv

from nudge_engine.layers.attention_metadata import AttentionMetadata
from nudge_engine.layers.attention_torch import NO_SOFTCAP, NO_WINDOW


class TritonAttentionBackend:
    """store_kv + paged_attention. Picked by the engine on CUDA; the tests also run it on the CPU
    under TRITON_INTERPRET=1."""

    name = "triton"

    def plan(self, meta: AttentionMetadata) -> None:
        # Nothing to derive: the kernels read the metadata tensors directly and take the path
        # (decode or general) from the host-side max_query_len, so planning never syncs.
        meta.plan["triton_decode"] = meta.max_query_len == 1

    def forward(
        self,
        query: torch.Tensor,    # [num_tokens, num_heads, head_dim]
        key: torch.Tensor,      # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,    # [num_tokens, num_kv_heads, head_dim]
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int = NO_WINDOW,
        softcap: float = NO_SOFTCAP,
    ) -> torch.Tensor:          # [num_tokens, num_heads, head_dim]
        store_kv(key, value, k_cache, v_cache, meta.slot_mapping)
        return paged_attention(query, k_cache, v_cache, meta, scale, sliding_window, softcap,
                               decode=meta.plan.get("triton_decode"))
