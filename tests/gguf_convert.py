"""Writes a tiny Hugging Face model folder as a GGUF file the way llama.cpp's converter does.

What llama.cpp changes on the way, and the loader must undo: tensor names, dimension order
(GGUF lists the innermost first), Q/K rows permuted for the interleaved rotary layout (Llama,
OLMo: `LlamaModel.permute` in convert_hf_to_gguf.py) and Gemma's RMSNorm weights stored as 1 + w.
"""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import load_file

GGUF_ARCH = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Gemma2ForCausalLM": "gemma2",
             "OlmoForCausalLM": "olmo", "Olmo2ForCausalLM": "olmo2"}
PERMUTED = {"llama", "olmo"}
BLOCK = {  # Hugging Face module in model.layers.N -> llama.cpp name, per family where they differ
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
}
NORMS = {
    "gemma2": {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
               "post_feedforward_layernorm": "post_ffw_norm"},
    "olmo2": {"post_attention_layernorm": "post_attention_norm", "post_feedforward_layernorm": "post_ffw_norm"},
}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(arch: str, name: str) -> str:
    top = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    module, _, leaf = name.rpartition(".")
    if module in top:
        return f"{top[module]}.{leaf}"
    _, _, block, part = module.split(".", 3)
    table = {**BLOCK, "post_attention_layernorm": "ffn_norm", **NORMS.get(arch, {})}
    return f"blk.{block}.{table[part]}.{leaf}"


def _tensors(folder: Path) -> dict[str, np.ndarray]:
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def write_gguf(folder: Path, out: Path, types: dict[str, str] | None = None, tokenizer: str = "gpt2",
               drop: tuple[str, ...] = (), arch: str | None = None) -> Path:
    """types: GGUF name -> quantization type name (default F32); drop: GGUF names left out;
    arch: general.architecture written in place of the folder's."""
    cfg = json.loads((folder / "config.json").read_text())
    arch, arch_override = GGUF_ARCH[cfg["architectures"][0]], arch
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    w = gguf.GGUFWriter(str(out), arch_override or arch)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    if arch == "olmo":
        w.add_layer_norm_eps(1e-5)
        w.add_clamp_kqv(cfg["clip_qkv"])
    else:
        w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    if arch == "gemma2":
        w.add_sliding_window(cfg["sliding_window"])
        w.add_float32("gemma2.attn_logit_softcapping", cfg["attn_logit_softcapping"])
        w.add_float32("gemma2.final_logit_softcapping", cfg["final_logit_softcapping"])
    if arch == "llama":
        w.add_rope_dimension_count(head_dim)
    _add_tokenizer(w, folder, tokenizer, cfg, arch)
    for name, t in _tensors(folder).items():
        t = t.astype(np.float32)
        if arch in PERMUTED and name.endswith(("q_proj.weight", "q_proj.bias")):
            t = llama_cpp_permute(t, heads)
        if arch in PERMUTED and name.endswith(("k_proj.weight", "k_proj.bias")):
            t = llama_cpp_permute(t, kv_heads)
        if arch == "gemma2" and name.endswith("norm.weight"):
            t = t + 1
        gname = gguf_name(arch, name)
        if gname in drop:
            continue
        qtype = gguf.GGMLQuantizationType[(types or {}).get(gname, "F32")]
        if qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(gname, t)
        elif qtype.name in K_SCALES:
            w.add_tensor(gname, random_k_blocks(qtype, t.shape, seed=len(gname)), raw_dtype=qtype)
        else:
            w.add_tensor(gname, gguf.quants.quantize(t, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


# Where a K block keeps its float16 super-scales: (byte offset, count) of d (and dmin).
K_SCALES = {"Q2_K": (-4, 2), "Q3_K": (-2, 1), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (-2, 1)}


def random_k_blocks(qtype, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """gguf-py cannot quantize K types: random block bytes with sane float16 super-scales instead."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = int(np.prod(shape[:-1])), shape[-1]
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    at, count = K_SCALES[qtype.name]
    at %= size
    scale = rng.uniform(1e-3, 2e-2, size=(rows, cols // block, count)).astype(np.float16).view(np.uint8)
    data[..., at:at + 2 * count] = scale
    return data.reshape(*shape[:-1], cols // block * size)


def _add_tokenizer(w, folder: Path, kind: str, cfg: dict, arch: str) -> None:
    spec = json.loads((folder / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    special = {t["content"]: t["id"] for t in spec["added_tokens"]}
    tokens = [None] * (1 + max([*vocab.values(), *special.values()]))
    for t, i in {**vocab, **special}.items():
        tokens[i] = t
    types = [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens]
    w.add_tokenizer_model(kind)
    w.add_token_list(tokens)
    if kind == "gpt2":
        w.add_tokenizer_pre("default")
        w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    else:  # sentencepiece: scores, no merges; later (rarer) merges score lower
        types = [gguf.TokenType.BYTE if t.startswith("<0x") and t.endswith(">") else k for t, k in zip(tokens, types)]
        w.add_token_scores([-float(i) for i in range(len(tokens))])
        w.add_add_space_prefix(arch != "gemma2")   # Gemma's sentencepiece adds no dummy prefix
    w.add_token_types(types)
    w.add_bos_token_id(cfg["bos_token_id"])
    eos = cfg["eos_token_id"]
    w.add_eos_token_id(eos if isinstance(eos, int) else eos[0])
    tc = json.loads((folder / "tokenizer_config.json").read_text())
    w.add_add_bos_token(bool(tc.get("add_bos_token")))
    if tc.get("chat_template"):
        w.add_chat_template(tc["chat_template"])
