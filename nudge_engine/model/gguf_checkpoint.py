"""GGUF checkpoints (llama.cpp's one-file format): config, tensor names and weights, read with `gguf`.

A `.gguf` path works wherever a model folder does. The file is checked before anything is allocated
(unreadable or truncated file, unknown architecture, tensor types we cannot dequantize), its
metadata becomes a config.json-style dict, and its llama.cpp tensor names are mapped to the
Hugging Face names the models already load. Each tensor is dequantized (gguf's own
`gguf.quants.dequantize`) and cast to the requested dtype on load, undoing what llama.cpp's
converter changed: the rotary Q/K row permutation (Llama, OLMo) and Gemma's `norm + 1`.

`gguf` is imported only here, and only when a .gguf path is given.
"""
from __future__ import annotations

import functools
import math
import re
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from .errors import ModelFolderError

GGUF_SUFFIX = ".gguf"
GGUF_MAGIC = b"GGUF"

# general.architecture -> config.json architectures[0]
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "olmo": "OlmoForCausalLM",
    "olmo2": "Olmo2ForCausalLM",
}
# llama.cpp's converter permutes Q/K rows for its interleaved rotary layout in these families only.
PERMUTED_QK = {"llama", "olmo"}
# llama.cpp stores Gemma's RMSNorm weights as (1 + w).
NORM_PLUS_ONE = {"gemma2"}
GEMMA2_27B_LAYERS = 46  # llama.cpp scales Gemma-2 27B's queries by hidden/heads, the others by head_dim
MAX_DIMS = 4   # GGML_MAX_DIMS
DEQUANTIZABLE = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                 "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

_BLOCK = "model.layers.{}."
_COMMON = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_PRE_NORM = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
# Per family: llama.cpp block tensor -> Hugging Face module inside model.layers.N.
BLOCK_NAMES = {
    "llama": {**_COMMON, **_PRE_NORM},
    "qwen2": {**_COMMON, **_PRE_NORM},
    "olmo": {**_COMMON, **_PRE_NORM},
    "gemma2": {**_COMMON, "attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
               "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"},
    "olmo2": {**_COMMON, "post_attention_norm": "post_attention_layernorm",
              "post_ffw_norm": "post_feedforward_layernorm"},
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_TOP_RE = re.compile(r"^(\w+)\.(weight|bias)$")


def is_gguf(path: str | Path) -> bool:
    return Path(path).suffix.lower() == GGUF_SUFFIX


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ModelFolderError("reading a .gguf file needs the `gguf` package: pip install gguf") from None
    return gguf


@functools.lru_cache(maxsize=4)
def _cached_reader(path: str, mtime_ns: int, size: int):
    """Parsing a 50k-token vocabulary takes seconds; config, tokenizer and weights share one reader."""
    gguf = _gguf()

    class CheckedReader(gguf.GGUFReader):
        """gguf's reader, with the tensor infos checked (_check_tensor_infos) before it builds any tensor."""

        def _build_tensors(self, start_offs, fields) -> None:
            _check_tensor_infos(fields, int(start_offs), int(self.alignment), len(self.data), gguf)
            super()._build_tensors(start_offs, fields)

    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):   # numpy's overflow warnings on a bad file
            warnings.simplefilter("ignore")
            return CheckedReader(path, "r")
    except _TensorInfoError as e:
        raise ModelFolderError(f"{path}: {e}") from None
    except Exception as e:  # gguf raises ValueError, struct and numpy errors alike on a bad file
        raise ModelFolderError(f"{path}: corrupt or truncated GGUF file ({type(e).__name__}: {e})") from None


def open_gguf(path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise ModelFolderError(f"{path}: no such GGUF file")
    with path.open("rb") as f:
        magic = f.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise ModelFolderError(f"{path}: not a GGUF file (it does not start with {GGUF_MAGIC!r})")
    stat = path.stat()
    return _cached_reader(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


class _TensorInfoError(ValueError):
    """A tensor info is wrong; open_gguf names the file."""


def _check_tensor_infos(fields, data_start: int, alignment: int, size: int, gguf) -> None:
    """Every tensor's type, shape and place in the file, from its raw tensor-info field and in Python
    integers, before gguf builds any tensor from them (its uint64 sums wrap around: an offset of
    2**64 - 32 would read the bytes before the data section). As llama.cpp requires, the tensors follow
    each other in file order, each at the previous one's end rounded up to the file's alignment, and
    the last ends inside the file."""
    expected = 0
    for field_ in fields:
        name_data, dims, raw_type, offset = (field_.parts[i] for i in (1, 3, 4, 5))
        name = bytes(name_data).decode("utf-8", "backslashreplace")
        offset, shape = int(offset[0]), [int(d) for d in dims]
        try:
            qtype = gguf.GGMLQuantizationType(int(raw_type[0]))
        except ValueError:
            raise _TensorInfoError(f"tensor {name!r} has unknown type number {int(raw_type[0])}") from None
        if qtype.name not in DEQUANTIZABLE:
            raise _TensorInfoError(f"tensor {name!r} has type {qtype.name}, which cannot be dequantized "
                                   f"(supported: {', '.join(DEQUANTIZABLE)})")
        block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        if not shape or len(shape) > MAX_DIMS or min(shape) < 1 or shape[0] % block:
            raise _TensorInfoError(f"tensor {name!r} has a malformed shape {shape[::-1]} for type {qtype.name} "
                                   f"(rows of whole {block}-value blocks, 1 to {MAX_DIMS} dimensions)")
        n_bytes = math.prod(shape) // block * block_bytes
        end = data_start + offset + n_bytes
        if end > size:
            if data_start + offset < size:
                raise _TensorInfoError(f"truncated: tensor {name!r} ends at byte {end}, the file has {size}")
            raise _TensorInfoError(f"corrupt: tensor {name!r} has offset {offset}, past the end of the file (its "
                                   f"data would start at byte {data_start + offset}, the file has {size})")
        if offset != expected:
            raise _TensorInfoError(f"corrupt: tensor {name!r} starts at offset {offset} of the data section, "
                                   f"expected {expected} (each tensor follows the previous one)")
        expected = -(-(offset + n_bytes) // alignment) * alignment


def field(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def architecture(reader, path: Path) -> str:
    arch = field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ModelFolderError(f"{path}: GGUF architecture {arch!r} is not supported "
                               f"(supported: {', '.join(sorted(ARCHITECTURES))})")
    return arch


def hf_shape(tensor) -> tuple[int, ...]:
    """GGUF lists dimensions innermost first; torch and safetensors outermost first."""
    return tuple(int(d) for d in reversed(tensor.shape))


def config_dict(path: str | Path) -> dict:
    """The file's metadata as the fields of a Hugging Face config.json (what config.py reads)."""
    path = Path(path)
    reader = open_gguf(path)
    arch = architecture(reader, path)

    def get(key: str, default: Any = None) -> Any:
        return field(reader, f"{arch}.{key}", default)

    def need(key: str) -> Any:
        value = get(key)
        if value is None:
            raise ModelFolderError(f"{path}: required GGUF metadata {arch}.{key} is missing")
        return value

    names = {t.name for t in reader.tensors}
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embed is None:
        raise ModelFolderError(f"{path}: no token_embd.weight tensor")
    if get("rope.scaling.type", "none") not in ("none", None) or "rope_freqs.weight" in names:
        raise ModelFolderError(f"{path}: rotary scaling in a GGUF file (rope.scaling.type / rope_freqs) "
                               "is not supported")
    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    head_dim = int(get("attention.key_length") or hidden // heads)
    rope_dim = get("rope.dimension_count")
    if rope_dim is not None and int(rope_dim) != head_dim:
        raise ModelFolderError(f"{path}: partial rotary ({arch}.rope.dimension_count {rope_dim} of head_dim "
                               f"{head_dim}) is not supported")
    eos = [field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    raw = {
        "architectures": [ARCHITECTURES[arch]],
        "vocab_size": hf_shape(embed)[0],
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv") or heads),
        "head_dim": head_dim,
        "max_position_embeddings": int(get("context_length") or 4096),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon") or get("attention.layer_norm_epsilon") or 1e-5),
        "rope_theta": float(get("rope.freq_base") or 10000.0),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "eos_token_id": list(dict.fromkeys(int(e) for e in eos if e is not None)),
        "bos_token_id": field(reader, "tokenizer.ggml.bos_token_id"),
    }
    if arch == "olmo" and get("attention.clamp_kqv") is not None:
        raw["clip_qkv"] = float(get("attention.clamp_kqv"))
    if arch == "gemma2":
        raw.update(
            hidden_activation="gelu_pytorch_tanh",
            sliding_window=int(need("attention.sliding_window")),
            attn_logit_softcapping=float(get("attn_logit_softcapping") or 0.0),
            final_logit_softcapping=float(get("final_logit_softcapping") or 0.0),
            query_pre_attn_scalar=hidden // heads if raw["num_hidden_layers"] == GEMMA2_27B_LAYERS else head_dim,
        )
    return raw


def hf_name(arch: str, name: str) -> str | None:
    """llama.cpp tensor name -> Hugging Face checkpoint name, or None for a name we do not know."""
    m = _BLOCK_RE.match(name)
    if m:
        block, part, leaf = m.groups()
        module = BLOCK_NAMES[arch].get(part)
        return None if module is None else f"{_BLOCK.format(block)}{module}.{leaf}"
    m = _TOP_RE.match(name)
    if m and m.group(1) in TOP_NAMES:
        return f"{TOP_NAMES[m.group(1)]}.{m.group(2)}"
    return None


def tensor_shapes(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Hugging Face name -> (shape, GGUF name); an unknown tensor is an error, not silently skipped."""
    reader = open_gguf(path)
    arch = architecture(reader, path)
    shapes, unknown = {}, []
    for t in reader.tensors:
        name = hf_name(arch, t.name)
        if name is None:
            unknown.append(t.name)
        else:
            shapes[name] = (hf_shape(t), t.name)
    if unknown:
        raise ModelFolderError(f"{path}: tensors unknown for GGUF architecture {arch!r}: {', '.join(unknown[:10])}")
    return shapes


def _unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of llama.cpp's `LlamaModel.permute`: per head, rows (pair, half) -> (half, pair)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def iter_tensors(path: Path, config) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, float32 CPU tensor in Hugging Face layout) for each tensor of the file."""
    gguf = _gguf()
    reader = open_gguf(path)
    arch = architecture(reader, path)
    for t in reader.tensors:
        name = hf_name(arch, t.name)
        values = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        tensor = torch.from_numpy(values.reshape(hf_shape(t)).copy())
        if arch in PERMUTED_QK and t.name.endswith(("attn_q.weight", "attn_q.bias")):
            tensor = _unpermute_qk(tensor, config.num_heads)
        elif arch in PERMUTED_QK and t.name.endswith(("attn_k.weight", "attn_k.bias")):
            tensor = _unpermute_qk(tensor, config.num_kv_heads)
        elif arch in NORM_PLUS_ONE and t.name.endswith("norm.weight"):
            tensor = tensor - 1
        yield name, tensor
