"""The decoder-only causal LM shared by every family; a family file only fills an ArchSpec."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..config import ModelConfig
from ...layers.attention import Attention, AttentionSpec
from ...layers.attention_torch import NO_SOFTCAP
from ...layers.decoder import DecoderLayer
from ...layers.embedding import VocabParallelEmbedding
from ...layers.forward_context import ForwardContext
from ...layers.linear import Linear
from ...layers.mlp import GatedMLP
from ...layers.parallel import current
from ...layers.rotary import RotaryEmbedding

# Checkpoint names of the fused projections' parts: suffix -> (our parameter's module, shard).
FUSED_SHARDS = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", "gate"),
    "up_proj": ("gate_up_proj", "up"),
}


@dataclass(frozen=True)
class ArchSpec:
    make_norm: Callable[[int], nn.Module]    # dim -> norm module
    norm_roles: dict[str, str]               # checkpoint norm name -> place in the block (layers/decoder.py)
    activation: str
    attention: Callable[[int], AttentionSpec]  # layer index -> its attention settings
    embed_scale: float | None = None         # Gemma: embeddings times sqrt(hidden)
    final_softcap: float = NO_SOFTCAP        # Gemma-2: tanh(logits / cap) * cap
    extra_ignored: tuple[str, ...] = field(default=())  # checkpoint tensors that are not parameters


class Body(nn.Module):
    """`model.*` in the checkpoint: embeddings, blocks, final norm."""

    def __init__(self, config: ModelConfig, arch: ArchSpec):
        super().__init__()
        # Uninitialized: the checkpoint fills it (a random init would cost start-up time, and its
        # reference path pulls in torch._dynamo).
        tp = current()
        if tp.size > 1:   # tensor parallel: each rank holds its share of the vocabulary (layers/parallel.py)
            self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        else:
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                             _weight=torch.empty(config.vocab_size, config.hidden_size))  # [vocab, hidden]
        rotary = RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope)
        self.layers = nn.ModuleList(
            DecoderLayer(
                Attention(config.hidden_size, arch.attention(i), rotary, i),
                GatedMLP(config.hidden_size, config.intermediate_size, arch.activation),
                arch.norm_roles,
                lambda: arch.make_norm(config.hidden_size),
            )
            for i in range(config.num_layers)
        )
        self.norm = arch.make_norm(config.hidden_size)


class CausalLM(nn.Module):
    def __init__(self, config: ModelConfig, arch: ArchSpec):
        super().__init__()
        self.config = config
        self.arch = arch
        self.model = Body(config, arch)
        tp = current()
        if not config.tie_word_embeddings:
            self.lm_head = (Linear(config.hidden_size, config.vocab_size) if tp.size == 1  # weight [vocab, hidden]
                            else VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp))

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens]
        positions: torch.Tensor,  # [num_tokens]
        ctx: ForwardContext,
        rows: torch.Tensor | None = None,  # [num_rows] int64: the rows whose hidden state is wanted
    ) -> torch.Tensor:            # [num_rows (default num_tokens), hidden] after the final norm
        x = self.model.embed_tokens(input_ids)
        if self.arch.embed_scale is not None:
            x = x * torch.tensor(self.arch.embed_scale, dtype=x.dtype)
        residual = pending_post = None
        for layer in self.model.layers:
            x, residual = layer(positions, x, residual, pending_post, ctx)
            pending_post = layer.norm("post_mlp")
        # The last add and the final norm, for the logits rows only.
        return ctx.backend.add_norm(x, residual, pending_post, self.model.norm, rows)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [n, hidden] -> [n, vocab] float32
        head = self.model.embed_tokens if self.config.tie_word_embeddings else self.lm_head
        logits = (head.logits(hidden) if isinstance(head, VocabParallelEmbedding) else hidden @ head.weight.t()).float()
        if self.arch.final_softcap != NO_SOFTCAP:
            logits = torch.tanh(logits / self.arch.final_softcap) * self.arch.final_softcap
        return logits

    def checkpoint_to_param(self, name: str) -> tuple[str, str | None] | None:
        """Checkpoint tensor name -> (parameter name, shard), or None for a tensor to skip."""
        if name in self.arch.extra_ignored or name.endswith("rotary_emb.inv_freq"):
            return None
        if name == "lm_head.weight" and self.config.tie_word_embeddings:
            return None  # tied checkpoints sometimes keep a copy; the embedding is the head
        module, _, leaf = name.rpartition(".")
        parent, _, proj = module.rpartition(".")
        if proj in FUSED_SHARDS:
            fused, shard = FUSED_SHARDS[proj]
            return f"{parent}.{fused}.{leaf}", shard
        return name, None
