"""Llama-2 / Llama-3 (rope_scaling llama3) and Qwen2 (q/k/v bias): pre-norm RMSNorm blocks."""
from __future__ import annotations

from functools import partial

from ..config import ModelConfig
from ...layers.attention import AttentionSpec
from ...layers.norm import RMSNorm
from .transformer import ArchSpec

PRE_NORM = {"input_layernorm": "pre_attn", "post_attention_layernorm": "pre_mlp"}


def llama_arch(config: ModelConfig, qkv_bias: bool | None = None) -> ArchSpec:
    bias = config.get("attention_bias", False) if qkv_bias is None else qkv_bias
    spec = AttentionSpec(
        config.num_heads, config.num_kv_heads, config.head_dim, config.head_dim**-0.5, bias=bool(bias)
    )
    return ArchSpec(
        make_norm=partial(RMSNorm, eps=config.norm_eps),
        norm_roles=PRE_NORM,
        activation=config.get("hidden_act", "silu"),
        attention=lambda layer: spec,
    )


def qwen2_arch(config: ModelConfig) -> ArchSpec:
    if config.get("use_sliding_window", False):
        raise ValueError("config.json: Qwen2 use_sliding_window=true is not supported")
    return llama_arch(config, qkv_bias=True)
