"""Gemma-2: scaled embeddings, sandwich norms with (1 + w), softcapping, alternating sliding windows."""
from __future__ import annotations

from functools import partial

from ..config import ModelConfig
from ...layers.attention import AttentionSpec
from ...layers.attention_torch import NO_WINDOW
from ...layers.norm import RMSNorm
from .transformer import ArchSpec

SANDWICH = {
    "input_layernorm": "pre_attn",
    "post_attention_layernorm": "post_attn",
    "pre_feedforward_layernorm": "pre_mlp",
    "post_feedforward_layernorm": "post_mlp",
}


def _layer_types(config: ModelConfig) -> list[str]:
    types = config.get("layer_types")
    if types is None:  # transformers 4.x: even layers slide
        types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(config.num_layers)]
    return list(types)


def gemma2_arch(config: ModelConfig) -> ArchSpec:
    types = _layer_types(config)
    window = int(config.get("sliding_window", NO_WINDOW))
    scale = float(config.get("query_pre_attn_scalar", config.head_dim)) ** -0.5
    softcap = float(config.get("attn_logit_softcapping", 0.0))

    def attention(layer: int) -> AttentionSpec:
        sliding = types[layer] == "sliding_attention"
        return AttentionSpec(
            config.num_heads, config.num_kv_heads, config.head_dim, scale,
            bias=bool(config.get("attention_bias", False)),
            softcap=softcap,
            sliding_window=window if sliding else NO_WINDOW,
        )

    return ArchSpec(
        make_norm=partial(RMSNorm, eps=config.norm_eps, unit_offset=True),
        norm_roles=SANDWICH,
        activation=config.get("hidden_activation", config.get("hidden_act", "gelu_pytorch_tanh")),
        attention=attention,
        embed_scale=config.hidden_size**0.5,
        final_softcap=float(config.get("final_logit_softcapping", 0.0)),
    )
