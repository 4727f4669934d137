"""Owns one model, its paged KV cache and its attention backend; runs one forward per call.

KV cache: kv_cache[layer] = (k, v), each [num_blocks, block_size, num_kv_heads, head_dim]
(vLLM / FlashInfer "NHD" paged layout: a block's tokens are contiguous, so a decode kernel reads
one block as one dense tile).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ModelConfig
from ..layers.attention_metadata import AttentionMetadata
from ..layers.attention_torch import TorchAttentionBackend
from ..layers.forward_context import ForwardContext
from .families import CausalLM

DEFAULT_BLOCK_SIZE = 16
DEFAULT_CPU_KV_BYTES = 256 * 1024 * 1024
DEFAULT_GPU_MEMORY_FRACTION = 0.85


@dataclass
class StepInputs:
    """One model pass, flattened over sequences (built by the C++ batch builder)."""

    input_ids: torch.Tensor        # [num_tokens] int64
    positions: torch.Tensor        # [num_tokens] int64
    slot_mapping: torch.Tensor     # [num_tokens] int64
    block_tables: torch.Tensor     # [num_seqs, max_blocks] int32
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor         # [num_seqs] int32
    max_query_len: int
    max_seq_len: int

    @classmethod
    def from_batch(cls, batch, device: torch.device) -> "StepInputs":
        """From the core's BatchArrays (numpy views of C++ buffers: wrapped, then one copy to the device)."""
        def t(a):
            return torch.from_numpy(a).to(device, non_blocking=True)
        return cls(t(batch.input_ids), t(batch.positions), t(batch.slot_mapping), t(batch.block_tables),
                   t(batch.query_start_loc), t(batch.seq_lens), int(batch.max_query_len), int(batch.max_seq_len))


def make_backend(name: str, device: torch.device):
    """'auto' is Triton on CUDA and torch elsewhere; 'triton' on the CPU runs the kernels interpreted."""
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "torch":
        return TorchAttentionBackend()
    if name == "triton":
        from ..kernels.backend import TritonAttentionBackend  # imports triton: only when asked for
        return TritonAttentionBackend()
    raise ValueError(f"attention_backend {name!r} is not one of 'auto', 'torch', 'triton'")


def kv_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    itemsize = torch.empty((), dtype=dtype).element_size()
    return config.num_layers * 2 * block_size * config.num_kv_heads * config.head_dim * itemsize


class ModelRunner:
    def __init__(self, model: CausalLM, config: ModelConfig, device: torch.device, dtype: torch.dtype,
                 num_blocks: int, block_size: int = DEFAULT_BLOCK_SIZE, attention_backend: str = "auto"):
        self.model = model
        self.config = config
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.backend = make_backend(attention_backend, device)
        self.kv_cache = torch.zeros(  # [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
            config.num_layers, 2, num_blocks, block_size, config.num_kv_heads, config.head_dim,
            dtype=dtype, device=device,
        )

    @torch.inference_mode()
    def forward(self, step: StepInputs, logits_indices: torch.Tensor) -> torch.Tensor:
        """Writes the step's K/V into the cache; returns float32 logits [len(logits_indices), vocab]."""
        meta = AttentionMetadata(step.slot_mapping, step.block_tables, step.query_start_loc, step.seq_lens,
                                 step.max_query_len, step.max_seq_len, self.block_size)
        self.backend.plan(meta)
        ctx = ForwardContext(meta, self.backend, self.kv_cache)
        hidden = self.model(step.input_ids, step.positions, ctx, rows=logits_indices)
        return self.model.compute_logits(hidden)
