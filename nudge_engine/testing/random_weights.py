"""Random weights for the tiny models (model_factory.py): seeded per tensor name, peaky heads, and
per-family layouts (biases, norm gains, tied heads), so that a loader bug changes the logits.

May import: testing/model_factory.py's Family only for typing.
"""
from __future__ import annotations

import hashlib
import math
from typing import TYPE_CHECKING, Any, Mapping

import torch

if TYPE_CHECKING:
    from nudge_engine.testing.model_factory import Family

NORM_GAIN_JITTER = 0.1  # relative noise on norm gains, so a loader that ignores them gets caught
BIAS_STD = 0.2
TIED_LAYERNORM_BRANCH_GAIN = 8.0  # tied OLMo only: residual branches this much wider than the embedding


def init_weights(
    traits: Family,
    config: Mapping[str, Any],
    *,
    seed: int,
    shared_seed: int,
    peakiness: float,
    residual_scale: float,
) -> dict[str, torch.Tensor]:
    """Random float32 tensors under their Hugging Face names, in checkpoint order.

    Scales: the embedding enters the residual stream with RMS ~1, every projection keeps RMS ~1
    (std 1/sqrt(fan_in)), and the logits come out with std ~peakiness.
    """
    blocks = _Draw(traits, f"{seed}/")
    # Keyed by tensor name only, so models of different families draw the same shared values.
    shared = _Draw(traits, f"shared/{shared_seed}/")
    ends = _embedding_and_head(traits, config, shared, peakiness)
    if config["tie_word_embeddings"] and traits.rms_norm_eps is None:
        residual_scale *= TIED_LAYERNORM_BRANCH_GAIN  # see the tied OLMo head in _embedding_and_head
    tensors = {"model.embed_tokens.weight": ends.pop("model.embed_tokens.weight")}
    for i in range(config["num_hidden_layers"]):
        tensors.update(_layer_weights(traits, config, blocks, f"model.layers.{i}", residual_scale))
    tensors.update(ends)
    return tensors


class _Draw:
    """Seeded initializers; each tensor's values depend only on the key prefix and its name."""

    def __init__(self, traits: Family, prefix: str) -> None:
        self.gain_offset = traits.gain_offset
        self.prefix = prefix

    def normal(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return _standard_normal(self.prefix + name, shape)

    def linear(self, name: str, out_features: int, in_features: int, bias: bool, gain: float = 1.0) -> dict:
        weight = self.normal(f"{name}.weight", (out_features, in_features)) * (gain / math.sqrt(in_features))
        made = {f"{name}.weight": weight}  # [out, in]
        if bias:
            made[f"{name}.bias"] = self.normal(f"{name}.bias", (out_features,)) * (BIAS_STD * gain)  # [out]
        return made

    def norm(self, name: str, size: int, gain: float = 1.0) -> dict:
        jitter = 1.0 + NORM_GAIN_JITTER * self.normal(f"{name}.weight", (size,))  # [size]
        return {f"{name}.weight": gain * jitter - self.gain_offset}


def _layer_weights(
    traits: Family, config: Mapping[str, Any], draw: _Draw, layer: str, residual_scale: float
) -> dict[str, torch.Tensor]:
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    qkv_bias = traits.qkv_bias or config.get("attention_bias", False)
    o_bias = config.get("attention_bias", False)  # Qwen2's o_proj has none
    mlp_bias = config.get("mlp_bias", False)
    parametric = traits.rms_norm_eps is not None
    # Gemma-2 and OLMo-2 normalize each branch output, so there the residual gain sits on that norm.
    projection_gain = 1.0 if traits.post_norms else residual_scale
    post_norm_gain = residual_scale if traits.post_norms else 1.0

    made: dict[str, torch.Tensor] = {}
    if traits.pre_norms and parametric:
        made.update(draw.norm(f"{layer}.input_layernorm", hidden))
    made.update(draw.linear(f"{layer}.self_attn.q_proj", heads * head_dim, hidden, qkv_bias))
    made.update(draw.linear(f"{layer}.self_attn.k_proj", kv_heads * head_dim, hidden, qkv_bias))
    made.update(draw.linear(f"{layer}.self_attn.v_proj", kv_heads * head_dim, hidden, qkv_bias))
    made.update(draw.linear(f"{layer}.self_attn.o_proj", hidden, heads * head_dim, o_bias, projection_gain))
    if traits.qk_norm:
        made.update(draw.norm(f"{layer}.self_attn.q_norm", heads * head_dim))
        made.update(draw.norm(f"{layer}.self_attn.k_norm", kv_heads * head_dim))
    if parametric:
        # Llama-style: the norm before the MLP; Gemma-2 / OLMo-2: the norm after attention.
        made.update(draw.norm(f"{layer}.post_attention_layernorm", hidden, post_norm_gain))
    if traits.pre_norms and traits.post_norms:  # Gemma-2 wraps the MLP in two norms too
        made.update(draw.norm(f"{layer}.pre_feedforward_layernorm", hidden))
    if traits.post_norms:
        made.update(draw.norm(f"{layer}.post_feedforward_layernorm", hidden, post_norm_gain))
    made.update(draw.linear(f"{layer}.mlp.gate_proj", inter, hidden, mlp_bias))
    made.update(draw.linear(f"{layer}.mlp.up_proj", inter, hidden, mlp_bias))
    made.update(draw.linear(f"{layer}.mlp.down_proj", hidden, inter, mlp_bias, projection_gain))
    return made


def _embedding_and_head(
    traits: Family, config: Mapping[str, Any], draw: _Draw, peakiness: float
) -> dict[str, torch.Tensor]:
    """The embedding, final norm and LM head, scaled so the logits have std ~peakiness.

    Logits = head . (final_gain * unit-RMS hidden), so their std is head_std * final_gain * sqrt(hidden).
    """
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    logit_unit = peakiness / math.sqrt(hidden)
    # Gemma multiplies its embeddings by sqrt(hidden); divide here so the residual stream starts at RMS ~1.
    embed_std = 1.0 / math.sqrt(hidden) if traits.embed_multiplier else 1.0
    made: dict[str, torch.Tensor] = {}
    if not config["tie_word_embeddings"]:
        if traits.rms_norm_eps is not None:
            made.update(draw.norm("model.norm", hidden))
        made["lm_head.weight"] = draw.normal("lm_head.weight", (vocab, hidden)) * logit_unit  # [vocab, hidden]
    elif traits.rms_norm_eps is not None:
        # A tied head scores the input token's own row with |e|^2 ~ hidden against ~sqrt(hidden) for
        # the others, so every model would just repeat its input. A final gain of random sign
        # makes head = E diag(g) and cancels that self-match on average.
        sign_and_size = draw.normal("model.norm.weight", (hidden,))  # [hidden]
        sign_and_size /= sign_and_size.square().mean().sqrt()  # exact RMS 1: peakiness means the same tied or not
        made["model.norm.weight"] = sign_and_size * (logit_unit / embed_std) - traits.gain_offset
    else:
        # OLMo tied: no gain to carry either the scale or the sign, so the embedding carries the
        # scale and wider residual branches drown the self-match (it shrinks as 1 / RMS(stream)).
        embed_std = logit_unit
    made["model.embed_tokens.weight"] = draw.normal("model.embed_tokens.weight", (vocab, hidden)) * embed_std
    return made


def _standard_normal(key: str, shape: tuple[int, ...]) -> torch.Tensor:
    """N(0, 1) draws from a generator seeded by `key`: a tensor's values do not depend on which
    other tensors exist or in what order they are made."""
    seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") >> 1
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float32)
