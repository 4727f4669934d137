"""Tiny random models written as complete Hugging Face folders (config, weights, tokenizer).

Every family uses its real `config.json` fields, `architectures[0]` and tensor names, so the
same folder loads in `transformers.AutoModelForCausalLM` and in the engine's own loader.
Weights are random but seeded per tensor: the same arguments give byte-identical files.

Two knobs shape the output distribution:
  peakiness       standard deviation of the logits; the default spreads the top-1 probability
                  over (0, 1) across prompts (some positions sure, others unsure).
  residual_scale  gain on every block's residual branch; 0 leaves only the embedding -> LM head
                  bigram, which `make_tiny_pair` uses to make two models agree.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import save_file

from nudge_engine.testing.random_weights import init_weights
from nudge_engine.testing.tokenizer_factory import STYLES, copy_tokenizer, make_tokenizer

DEFAULT_PEAKINESS = 4.5
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Family:
    architecture: str
    model_type: str
    tie_word_embeddings: bool
    rope_theta: float
    rms_norm_eps: float | None  # None: OLMo's non-parametric LayerNorm, no norm tensors at all
    gain_offset: float = 0.0  # Gemma's RMSNorm multiplies by (1 + weight): stored weight = gain - 1
    pre_norms: bool = True  # input_layernorm before attention (OLMo-2 has none)
    post_norms: bool = False  # the branch output is normalized before the residual add (Gemma-2, OLMo-2)
    qkv_bias: bool = False  # Qwen2 hard-codes q/k/v biases; others read attention_bias
    qk_norm: bool = False  # OLMo-2 normalizes whole q and k projections
    embed_multiplier: bool = False  # Gemma multiplies the embeddings by sqrt(hidden_size)


FAMILIES: dict[str, Family] = {
    "llama": Family("LlamaForCausalLM", "llama", False, 10000.0, 1e-5),
    "llama3": Family("LlamaForCausalLM", "llama", False, 500000.0, 1e-5),
    "qwen2": Family("Qwen2ForCausalLM", "qwen2", True, 1000000.0, 1e-6, qkv_bias=True),
    "gemma2": Family(
        "Gemma2ForCausalLM", "gemma2", True, 10000.0, 1e-6, gain_offset=1.0, post_norms=True, embed_multiplier=True
    ),
    # OLMo-1B(-0724) ties its embeddings.
    "olmo": Family("OlmoForCausalLM", "olmo", True, 10000.0, None),
    "olmo2": Family("Olmo2ForCausalLM", "olmo2", False, 500000.0, 1e-6, pre_norms=False, post_norms=True, qk_norm=True),
}

GEMMA2_SLIDING_WINDOW = 8  # shorter than test prompts, so the window is actually crossed
OLMO_CLIP_QKV = 2.0  # real OLMo uses 8; q/k/v here have std ~1, so 2 clips a few percent of them
LLAMA3_ORIGINAL_MAX_POSITIONS = 64  # small, so llama3 rope scaling changes tiny-model outputs


def make_tiny_model(
    out_dir: str | Path,
    family: str,
    tokenizer: str = "bytelevel",
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int | None = None,
    intermediate_size: int = 128,
    vocab_size: int | None = None,
    max_position_embeddings: int = 512,
    tie_word_embeddings: bool | None = None,
    shards: int = 1,
    dtype: str = "float32",
    peakiness: float = DEFAULT_PEAKINESS,
    residual_scale: float = 1.0,
    shared_seed: int | None = None,
    sliding_window: int | None = None,
    eos_token_id: int | list[int] | None = None,
    tokenizer_vocab_size: int = 512,
    **overrides: Any,
) -> Path:
    """Write a random `family` model with a `tokenizer`-style tokenizer into `out_dir`; return the folder.

    tokenizer: "bytelevel" or "metaspace" (see tokenizer_factory), or the path of a real model (folder or
        .gguf) whose tokenizer the random model uses. transformers 5 always loads a
        Qwen2 folder's tokenizer as Qwen2's byte-level one, so qwen2 + "metaspace" only suits
        loaders that read tokenizer.json themselves.

    head_dim None: hidden_size // num_heads (Gemma-2: twice that, as real Gemma-2 head_dim differs too).
    vocab_size None: the tokenizer's size; a larger value pads the embedding like real checkpoints do.
    tie_word_embeddings None: the family's default (Qwen2, Gemma-2, OLMo tied; Llama, OLMo-2 not).
    shared_seed: seed for the embedding, final norm and LM head (default: `seed`); two models with
        the same shared_seed and hidden_size share them, whatever their family.
    sliding_window: Gemma-2 (default 8) and Qwen2 (default off) only.
    residual_scale: gain on every residual branch (o_proj/down_proj, or Gemma-2/OLMo-2's post norms).
    eos_token_id: an int or a list (Llama-3 style); default the tokenizer's `</s>`.
    tokenizer_vocab_size: size of the trained tokenizer (make_tokenizer's vocab_size).
    overrides: extra or replaced config.json fields (rms_norm_eps, clip_qkv, attention_bias, ...);
        the tensors follow the final config.
    """
    _check_family(family)
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {tuple(DTYPES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    if tokenizer in STYLES:
        make_tokenizer(out, tokenizer, tokenizer_vocab_size, model_max_length=max_position_embeddings)
        bos, eos, pad = "<s>", "</s>", "<pad>"
    elif not Path(tokenizer).exists():
        raise ValueError(f"tokenizer {tokenizer!r} is neither a style {STYLES} nor a model folder or .gguf file")
    else:  # a real model's tokenizer (folder or .gguf), e.g. to nudge a random base with a real model
        bos, eos = copy_tokenizer(out, tokenizer)
        pad = eos
    special_ids, tokenizer_size = _read_tokenizer(out / "tokenizer.json")
    if vocab_size is not None and vocab_size < tokenizer_size:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer ({tokenizer_size} tokens)")

    config = _family_config(
        family,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        intermediate_size=intermediate_size,
        vocab_size=vocab_size or tokenizer_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=FAMILIES[family].tie_word_embeddings if tie_word_embeddings is None else tie_word_embeddings,
        dtype=dtype,
        sliding_window=sliding_window,
        bos_token_id=special_ids[bos],
        eos_token_id=special_ids[eos] if eos_token_id is None else eos_token_id,
        pad_token_id=special_ids[pad],
    )
    config.update(overrides)

    tensors = init_weights(
        FAMILIES[family],
        config,
        seed=seed,
        shared_seed=seed if shared_seed is None else shared_seed,
        peakiness=peakiness,
        residual_scale=residual_scale,
    )
    tensors = {name: tensor.to(DTYPES[dtype]).contiguous() for name, tensor in tensors.items()}

    _write_json(out / "config.json", config)
    generation = {key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    _write_json(out / "generation_config.json", generation)
    _write_safetensors(out, tensors, shards)
    return out


def make_tiny_pair(
    out_dir: str | Path,
    base_family: str = "llama",
    nudger_family: str = "llama",
    tokenizer: str = "bytelevel",
    agreement: float = 0.5,
    seed: int = 0,
    *,
    nudger_overrides: Mapping[str, Any] | None = None,
    **kw: Any,
) -> tuple[Path, Path]:
    """Write a base model and a smaller nudger into out_dir/"base" and out_dir/"nudger".

    Both get the same tokenizer files and the same embedding, final norm and LM head; their blocks
    differ (seeds `seed` and `seed + 1`) and their residual branches are scaled by (1 - agreement).
    Near agreement 1 both collapse onto the shared embedding -> LM head bigram and mostly agree;
    at 0 their blocks are unrelated (the shared embedding and head still correlate them a little).
    The knob is monotone but not linear, and not a probability of agreeing.

    Families may differ, but hidden_size (and so the embedding) must be the same. Both models get
    one tie_word_embeddings so the LM head is really shared: the family default for a same-family
    pair, untied for mixed families (a tied OLMo head has no norm gain and cannot match the others).
    Across families the agreement is looser: Gemma-2's softcapping, OLMo's LayerNorm and the
    final norms reshape the shared bigram.

    kw goes to both models; nudger_overrides (e.g. {"num_layers": 3}) only to the nudger, which
    defaults to half the base's layers (at least one).
    """
    if not 0.0 <= agreement <= 1.0:
        raise ValueError(f"agreement must lie in [0, 1], got {agreement}")
    for family in (base_family, nudger_family):
        _check_family(family)
    out = Path(out_dir)
    common = dict(kw)
    same_family = base_family == nudger_family
    common.setdefault("tie_word_embeddings", FAMILIES[base_family].tie_word_embeddings if same_family else False)
    base_layers = common.pop("num_layers", 2)
    residual_scale = 1.0 - agreement

    base = make_tiny_model(
        out / "base", base_family, tokenizer, seed=seed, shared_seed=seed,
        residual_scale=residual_scale, num_layers=base_layers, **common,
    )
    nudger_kw = {**common, "num_layers": max(1, base_layers // 2), **(nudger_overrides or {})}
    nudger = make_tiny_model(
        out / "nudger", nudger_family, tokenizer, seed=seed + 1, shared_seed=seed,
        residual_scale=residual_scale, **nudger_kw,
    )
    base_config, nudger_config = (json.loads((folder / "config.json").read_text()) for folder in (base, nudger))
    for key in ("hidden_size", "vocab_size"):
        if base_config[key] != nudger_config[key]:
            raise ValueError(f"a pair must share its embedding: {key} {base_config[key]} != {nudger_config[key]}")
    return base, nudger


def _family_config(
    family: str,
    *,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int | None,
    intermediate_size: int,
    vocab_size: int,
    max_position_embeddings: int,
    tie_word_embeddings: bool,
    dtype: str,
    sliding_window: int | None,
    bos_token_id: int,
    eos_token_id: int | list[int],
    pad_token_id: int,
) -> dict[str, Any]:
    """config.json with the field names the real checkpoints of `family` use."""
    traits = FAMILIES[family]
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} must be a multiple of num_kv_heads {num_kv_heads}")
    if head_dim is None:
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_heads {num_heads}; pass head_dim")
        # Real Gemma-2 head_dim is not hidden_size // num_heads; a loader must read it, so differ here too.
        head_dim = hidden_size // num_heads * (2 if family == "gemma2" else 1)
    if sliding_window is not None and family not in ("gemma2", "qwen2"):
        raise ValueError(f"{family} has no sliding-window attention")

    config: dict[str, Any] = {
        "architectures": [traits.architecture],
        "model_type": traits.model_type,
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "hidden_act": "gelu_pytorch_tanh" if family == "gemma2" else "silu",
        "max_position_embeddings": max_position_embeddings,
        "initializer_range": 0.02,
        "rope_theta": traits.rope_theta,
        "attention_dropout": 0.0,
        "tie_word_embeddings": tie_word_embeddings,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "torch_dtype": dtype,
        "use_cache": True,
    }
    if traits.rms_norm_eps is not None:
        config["rms_norm_eps"] = traits.rms_norm_eps
    # The attention modules read config.head_dim when present; write it where real configs do,
    # and anywhere it differs from hidden_size // num_heads.
    if family in ("llama", "llama3", "gemma2") or head_dim * num_heads != hidden_size:
        config["head_dim"] = head_dim
    if family != "qwen2":  # Qwen2 hard-codes its q/k/v biases and has no attention_bias field
        config["attention_bias"] = False
    config.update(_family_specific_fields(family, hidden_size, num_heads, num_layers, max_position_embeddings, sliding_window))
    return config


def _family_specific_fields(
    family: str,
    hidden_size: int,
    num_heads: int,
    num_layers: int,
    max_position_embeddings: int,
    sliding_window: int | None,
) -> dict[str, Any]:
    config: dict[str, Any] = {}
    if family == "llama":
        config.update(mlp_bias=False, pretraining_tp=1, rope_scaling=None)
    elif family == "llama3":
        config.update(
            mlp_bias=False,
            pretraining_tp=1,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": LLAMA3_ORIGINAL_MAX_POSITIONS,
            },
        )
    elif family == "qwen2":
        config.update(
            use_sliding_window=sliding_window is not None,
            sliding_window=sliding_window or max_position_embeddings,
            # Layers from max_window_layers on slide; 0 makes every layer slide when the window is on.
            max_window_layers=0 if sliding_window is not None else num_layers,
        )
    elif family == "gemma2":
        config.update(
            hidden_activation="gelu_pytorch_tanh",
            # Real Gemma-2 27B scales queries by hidden/heads rather than head_dim; differing from
            # head_dim here catches a loader that uses the wrong one.
            query_pre_attn_scalar=hidden_size // num_heads,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
            sliding_window=sliding_window or GEMMA2_SLIDING_WINDOW,
            # transformers 5 reads the per-layer pattern from here; even layers slide, as in Gemma-2.
            layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)],
        )
    elif family == "olmo":
        config.update(clip_qkv=OLMO_CLIP_QKV)
    return config


def _write_safetensors(out: Path, tensors: dict[str, torch.Tensor], shards: int) -> None:
    """One `model.safetensors`, or `shards` files plus the index transformers reads."""
    for stale in out.glob("model*.safetensors*"):
        stale.unlink()  # a previous run with another shard count must not leave files behind
    if shards == 1:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    names = list(tensors)
    if not 1 <= shards <= len(names):
        raise ValueError(f"shards must lie in [1, {len(names)}], got {shards}")
    sizes = {name: tensors[name].numel() * tensors[name].element_size() for name in names}
    total = sum(sizes.values())
    groups: list[list[str]] = [[]]
    written = 0
    for index, name in enumerate(names):
        left_with_this = len(names) - index
        shards_to_open = shards - len(groups)
        # Start the next shard once this one holds its share of bytes, or when every remaining
        # tensor is needed to keep the remaining shards non-empty.
        full = written >= len(groups) * total / shards
        if groups[-1] and shards_to_open and (full or left_with_this == shards_to_open):
            groups.append([])
        groups[-1].append(name)
        written += sizes[name]

    weight_map = {}
    for number, group in enumerate(groups, start=1):
        filename = f"model-{number:05d}-of-{shards:05d}.safetensors"
        save_file({name: tensors[name] for name in group}, str(out / filename), metadata={"format": "pt"})
        weight_map.update({name: filename for name in group})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    _write_json(out / "model.safetensors.index.json", index)


def _read_tokenizer(tokenizer_json: Path) -> tuple[dict[str, int], int]:
    """Special-token ids by content, and the number of ids the tokenizer can produce."""
    spec = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    special_ids = {token["content"]: token["id"] for token in spec["added_tokens"]}
    size = 1 + max([*spec["model"]["vocab"].values(), *special_ids.values()])
    return special_ids, size


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {tuple(FAMILIES)}")
