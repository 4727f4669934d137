"""TritonAttentionBackend: the CUDA backend (same interface as TorchAttentionBackend, which is its
reference). Besides attention it runs the fused per-layer steps, so a decoder layer is ten
launches: add + norm, QKV GEMM, rotary + KV store, attention (+ its combine when the context is
split), O GEMM, add + norm, gate-up GEMM, act-and-mul, down GEMM."""
from __future__ import annotations

import torch

from .act_and_mul import act_and_mul
from .add_norm import add_norm
from .paged_attention import paged_attention
from .rotary_store import rotary_store
from .store_kv import store_kv

from nudge_engine.layers.attention_metadata import AttentionMetadata
from nudge_engine.layers.attention_torch import NO_SOFTCAP, NO_WINDOW


class TritonAttentionBackend:
    """Picked by the engine on CUDA; the tests also run it on the CPU under TRITON_INTERPRET=1."""

    name = "triton"

    add_norm = staticmethod(add_norm)
    act_and_mul = staticmethod(act_and_mul)

    def plan(self, meta: AttentionMetadata) -> None:
        # Nothing to derive: the kernels read the metadata tensors directly and take the path
        # (decode or general) from the host-side max_query_len, so planning never syncs.
        meta.plan["triton_decode"] = meta.max_query_len == 1

    def rotary_store(self, qkv, positions, spec, rotary, q_norm, k_norm, k_cache, v_cache,
                     meta: AttentionMetadata) -> torch.Tensor:
        return rotary_store(qkv, positions, spec, rotary, q_norm, k_norm, k_cache, v_cache, meta.slot_mapping)

    def attend(
        self,
        query: torch.Tensor,    # [num_tokens, num_heads, head_dim]
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int = NO_WINDOW,
        softcap: float = NO_SOFTCAP,
    ) -> torch.Tensor:          # [num_tokens, num_heads, head_dim]
        return paged_attention(query, k_cache, v_cache, meta, scale, sliding_window, softcap,
                               decode=meta.plan.get("triton_decode"))

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
        """Store then attend, for callers that rotate themselves (the layers use rotary_store + attend)."""
        store_kv(key, value, k_cache, v_cache, meta.slot_mapping)
        return self.attend(query, k_cache, v_cache, meta, scale, sliding_window, softcap)
