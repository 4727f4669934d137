"""Paged attention in plain torch: the CPU backend and the reference for the Triton kernels
(with the other per-layer steps: rotary_store_torch here, add_norm_torch in norm.py,
act_and_mul_torch in mlp.py).

KV cache layout (one tensor per model, see model_runner.py):
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
Slot s lives at block s // block_size, offset s % block_size.
The queries of sequence i are its last qlen_i context positions (causal among themselves).
"""
from __future__ import annotations

import torch
from torch import nn

from .attention_metadata import NO_BLOCK, AttentionMetadata
from .mlp import act_and_mul_torch
from .norm import add_norm_torch

NO_WINDOW = 0   # sliding_window value meaning "attend to the whole context"
NO_SOFTCAP = 0.0


def store_kv_torch(
    key: torch.Tensor,           # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,         # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,       # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,       # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int, < 0 = skip
) -> None:
    slots = slot_mapping.long()
    if bool((slots < 0).any()):
        keep = slots >= 0
        slots, key, value = slots[keep], key[keep], value[keep]
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, key.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, value.to(v_cache.dtype))


def rotary_store_torch(
    qkv: torch.Tensor,           # [num_tokens, (num_heads + 2 * num_kv_heads) * head_dim]: q | k | v
    positions: torch.Tensor,     # [num_tokens] int64
    spec,                        # AttentionSpec: head counts, head_dim, clip_qkv
    rotary: nn.Module,           # RotaryEmbedding (its cos / sin tables)
    q_norm: nn.Module | None,    # OLMo-2 QK-norm over the whole q (and k) projection, or None
    k_norm: nn.Module | None,
    k_cache: torch.Tensor,       # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,       # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int, < 0 = skip
) -> torch.Tensor:               # [num_tokens, num_heads, head_dim] rotated queries
    """Everything between the QKV GEMM and attention: clip (OLMo), QK-norm (OLMo-2), rotary on q
    and k, K/V into the paged cache. The torch backend runs this; kernels/rotary_store.py fuses it."""
    n = qkv.shape[0]
    if spec.clip_qkv is not None:
        qkv = qkv.clamp(-spec.clip_qkv, spec.clip_qkv)
    q_size, kv_size = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    if q_norm is not None:
        q, k = q_norm(q), k_norm(k)
    q = q.reshape(n, spec.num_heads, spec.head_dim)
    k = k.reshape(n, spec.num_kv_heads, spec.head_dim)
    v = v.reshape(n, spec.num_kv_heads, spec.head_dim)
    q, k = rotary(positions, q, k)
    store_kv_torch(k, v, k_cache, v_cache, slot_mapping)
    return q


def plan_torch(meta: AttentionMetadata) -> None:
    """Index tensors shared by all layers of one step: padded per-sequence queries and keys."""
    device = meta.seq_lens.device
    qsl = meta.query_start_loc.long()
    qlens = qsl[1:] - qsl[:-1]                                   # [num_seqs]
    seq_lens = meta.seq_lens.long()                              # [num_seqs]
    num_seqs, q_max, k_max = meta.num_seqs, meta.max_query_len, meta.max_seq_len
    num_tokens = int(qsl[-1])

    seq_of_token = torch.repeat_interleave(torch.arange(num_seqs, device=device), qlens)  # [num_tokens]
    row_of_token = torch.arange(num_tokens, device=device) - qsl[seq_of_token]           # [num_tokens]

    q_pos = (seq_lens - qlens)[:, None] + torch.arange(q_max, device=device)[None, :]    # [num_seqs, q_max]
    k_pos = torch.arange(k_max, device=device)                                           # [k_max]
    tables = meta.block_tables.long()
    block = tables.gather(1, (k_pos // meta.block_size)[None, :].expand(num_seqs, -1))   # [num_seqs, k_max]
    key_valid = (k_pos[None, :] < seq_lens[:, None]) & (block != NO_BLOCK)              # [num_seqs, k_max]
    key_slots = torch.where(key_valid, block * meta.block_size + k_pos % meta.block_size, 0)

    meta.plan.update(
        seq_of_token=seq_of_token,
        row_of_token=row_of_token,
        q_pos=q_pos,
        k_pos=k_pos,
        key_slots=key_slots,
        causal=key_valid[:, None, :] & (k_pos[None, None, :] <= q_pos[:, :, None]),  # [num_seqs, q_max, k_max]
    )


def _mask(meta: AttentionMetadata, sliding_window: int) -> torch.Tensor:
    if sliding_window == NO_WINDOW:
        return meta.plan["causal"]
    key = f"window{sliding_window}"
    if key not in meta.plan:
        p = meta.plan
        # Same rule as transformers: key j is visible from query i iff i - window < j <= i.
        in_window = p["k_pos"][None, None, :] > p["q_pos"][:, :, None] - sliding_window
        meta.plan[key] = p["causal"] & in_window
    return meta.plan[key]


def _padded(query, k_cache, v_cache, meta: AttentionMetadata):
    """Queries scattered and keys/values gathered per sequence, in float32 (the reference must not
    round scores to bf16 or overflow in fp16).
    -> q [num_seqs, q_max, heads, head_dim], k and v [num_seqs, k_max, kv_heads, head_dim]"""
    if "causal" not in meta.plan:
        plan_torch(meta)
    p = meta.plan
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = k_cache.shape[2]
    q = query.new_zeros(meta.num_seqs, meta.max_query_len, num_heads, head_dim, dtype=torch.float32)
    q[p["seq_of_token"], p["row_of_token"]] = query.float()
    k = k_cache.view(-1, num_kv_heads, head_dim)[p["key_slots"]].float()
    v = v_cache.view(-1, num_kv_heads, head_dim)[p["key_slots"]].float()
    return q, k, v


def paged_attention_torch(
    query: torch.Tensor,    # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int = NO_WINDOW,
    softcap: float = NO_SOFTCAP,
) -> torch.Tensor:          # [num_tokens, num_heads, head_dim]
    q, k, v = _padded(query, k_cache, v_cache, meta)
    group = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    scores = torch.einsum("sqhd,skhd->shqk", q, k) * scale  # [num_seqs, heads, q_max, k_max]
    if softcap != NO_SOFTCAP:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~_mask(meta, sliding_window)[:, None, :, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num_(0.0)  # padded query rows are all -inf
    out = torch.einsum("shqk,skhd->sqhd", probs, v)
    return out[meta.plan["seq_of_token"], meta.plan["row_of_token"]].to(query.dtype)


def paged_attention_sdpa(
    query: torch.Tensor,    # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int = NO_WINDOW,
) -> torch.Tensor:          # [num_tokens, num_heads, head_dim]
    """The same attention through torch's fused SDPA (no softcapping): one op instead of five."""
    q, k, v = _padded(query, k_cache, v_cache, meta)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=_mask(meta, sliding_window)[:, None], scale=scale, enable_gqa=q.shape[2] != k.shape[2],
    )  # [num_seqs, heads, q_max, head_dim]; padded query rows are NaN and dropped below
    return out.transpose(1, 2)[meta.plan["seq_of_token"], meta.plan["row_of_token"]].to(query.dtype)


class TorchAttentionBackend:
    """Gather pages, then dense masked attention; the other per-layer steps as plain torch ops.
    Chosen at start-up on the CPU, and the reference for the Triton backend (kernels/backend.py),
    which has the same methods."""

    name = "torch"

    add_norm = staticmethod(add_norm_torch)
    act_and_mul = staticmethod(act_and_mul_torch)

    def plan(self, meta: AttentionMetadata) -> None:
        plan_torch(meta)

    def rotary_store(self, qkv, positions, spec, rotary, q_norm, k_norm, k_cache, v_cache,
                     meta: AttentionMetadata) -> torch.Tensor:
        return rotary_store_torch(qkv, positions, spec, rotary, q_norm, k_norm, k_cache, v_cache, meta.slot_mapping)

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
        if softcap == NO_SOFTCAP:
            return paged_attention_sdpa(query, k_cache, v_cache, meta, scale, sliding_window)
        return paged_attention_torch(query, k_cache, v_cache, meta, scale, sliding_window, softcap)

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
        store_kv_torch(key, value, k_cache, v_cache, meta.slot_mapping)
        return self.attend(query, k_cache, v_cache, meta, scale, sliding_window, softcap)
