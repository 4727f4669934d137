"""OLMo (OLMo-1B-0724-hf: non-parametric layer norm, clip_qkv) and OLMo-2 (QK-norm, post-norms)."""
from __future__ import annotations

from functools import partial

from ..config import ModelConfig
from ...layers.attention import AttentionSpec
from ...layers.norm import NonParametricLayerNorm, RMSNorm
from .llama import PRE_NORM
from .transformer import ArchSpec

POST_NORM = {"post_attention_layernorm": "post_attn", "post_feedforward_layernorm": "post_mlp"}


def olmo_arch(config: ModelConfig) -> ArchSpec:
    clip = config.get("clip_qkv")
    spec = AttentionSpec(
        config.num_heads, config.num_kv_heads, config.head_dim, config.head_dim**-0.5,
        bias=bool(config.get("attention_bias", False)),
        clip_qkv=float(clip) if clip is not None else None,
    )
    return ArchSpec(
        make_norm=NonParametricLayerNorm,
        norm_roles=PRE_NORM,
        activation=config.get("hidden_act", "silu"),
        attention=lambda layer: spec,
    )


def olmo2_arch(config: ModelConfig) -> ArchSpec:
    spec = AttentionSpec(
        config.num_heads, config.num_kv_heads, config.head_dim, config.head_dim**-0.5,
        bias=bool(config.get("attention_bias", False)),
        qk_norm_eps=config.norm_eps,
    )
    return ArchSpec(
        make_norm=partial(RMSNorm, eps=config.norm_eps),
        norm_roles=POST_NORM,
        activation=config.get("hidden_act", "silu"),
        attention=lambda layer: spec,
    )
