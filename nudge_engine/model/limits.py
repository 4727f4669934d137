"""Bounds on what a model file may ask for, checked before anything is allocated.

A config.json (or a GGUF file's metadata) is input like any other: `num_hidden_layers: 1e9` would
build a billion layers, `max_position_embeddings: 2**62` a rotary table no machine holds. Two checks,
each a one-line ModelFolderError naming the file and the field:

- check_sizes (from config.py, on every config): each size the layers allocate from is at most a
  limit far above any released model of the supported families, and the sizes agree with each
  other (heads divisible by KV heads, an even head_dim for the rotary halves);
- check_memory (from loader.py, before the shape-only build): an estimate of the bytes the model
  takes (weights in the load dtype, divided over tensor-parallel ranks, plus the rotary table) is at
  most the memory of the device it loads on.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import ModelFolderError

# config.json field -> its largest accepted value. The largest released models of the supported
# families stay far below: 126 layers, 128 heads, hidden 16384, intermediate 53248, head_dim 256,
# a 262144-token vocabulary, 131072 positions (Llama-3.1 405B, Gemma).
MAX_SIZES = {
    "num_hidden_layers": 1024,
    "num_attention_heads": 1024,
    "num_key_value_heads": 1024,
    "head_dim": 4096,
    "hidden_size": 1 << 17,
    "intermediate_size": 1 << 20,
    "vocab_size": 1 << 22,
    "max_position_embeddings": 1 << 24,
}
# Where a GGUF file keeps each of them (gguf_checkpoint.config_dict), to name it in the error.
GGUF_KEYS = {
    "num_hidden_layers": "{arch}.block_count", "num_attention_heads": "{arch}.attention.head_count",
    "num_key_value_heads": "{arch}.attention.head_count_kv", "head_dim": "{arch}.attention.key_length",
    "hidden_size": "{arch}.embedding_length", "intermediate_size": "{arch}.feed_forward_length",
    "vocab_size": "the rows of token_embd.weight", "max_position_embeddings": "{arch}.context_length",
}
ROTARY_TABLE_BYTES_PER_ENTRY = 2 * 4   # cos and sin, float32 (layers/rotary.py)
GIB = 1 << 30


def _field_name(field: str, config, path: Path) -> str:
    if Path(path).suffix.lower() != ".gguf":
        return repr(field)
    from .gguf_checkpoint import ARCHITECTURES
    arch = next((k for k, v in ARCHITECTURES.items() if v == config.architecture), "<architecture>")
    return f"{field!r} (GGUF: {GGUF_KEYS[field].format(arch=arch)})"


def check_sizes(config, path: Path) -> None:
    """config: a ModelConfig. Raises ModelFolderError naming `path` and the first field out of bounds."""
    values = {
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_position_embeddings,
    }
    for field, value in values.items():
        if value > MAX_SIZES[field]:
            raise ModelFolderError(f"{path}: field {_field_name(field, config, path)} is {value}, more than any model this engine loads "
                                   f"(at most {MAX_SIZES[field]}); the file is corrupt or not a supported model")
    if config.num_heads % config.num_kv_heads:
        raise ModelFolderError(f"{path}: field {_field_name('num_key_value_heads', config, path)} "
                               f"({config.num_kv_heads}) does not divide num_attention_heads ({config.num_heads})")
    if config.head_dim % 2:
        raise ModelFolderError(f"{path}: field {_field_name('head_dim', config, path)} is {config.head_dim}; "
                               "rotary embeddings need an even head_dim")


def estimate_bytes(config, dtype: torch.dtype, tp_size: int = 1) -> dict[str, int]:
    """Bytes one rank holds, by part: {description naming the fields: bytes}."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    hidden, head_dim = config.hidden_size, config.head_dim
    attention = hidden * head_dim * (2 * config.num_heads + 2 * config.num_kv_heads)   # q, o; k, v
    mlp = 3 * hidden * config.intermediate_size                                         # gate, up, down
    embeddings = config.vocab_size * hidden * (1 if config.tie_word_embeddings else 2)
    return {
        (f"num_hidden_layers {config.num_layers} x (hidden_size {hidden}, intermediate_size "
         f"{config.intermediate_size}, heads {config.num_heads}/{config.num_kv_heads} of head_dim {head_dim})"):
            config.num_layers * (attention + mlp) * itemsize // tp_size,
        f"vocab_size {config.vocab_size} x hidden_size {hidden}": embeddings * itemsize // tp_size,
        f"max_position_embeddings {config.max_position_embeddings} (rotary table)":
            config.max_position_embeddings * (head_dim // 2) * ROTARY_TABLE_BYTES_PER_ENTRY,
    }


def device_memory_bytes(device: torch.device) -> int | None:
    """What the device has in all (None where it cannot be told)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None
    return None


def check_memory(config, path: Path, device: torch.device, dtype: torch.dtype, tp_size: int = 1) -> None:
    """ModelFolderError when the model cannot fit the device's memory, naming its largest part's fields."""
    total = device_memory_bytes(device)
    if total is None:
        return
    parts = estimate_bytes(config, dtype, tp_size)
    need = sum(parts.values())
    if need > total:
        largest = max(parts, key=parts.get)
        raise ModelFolderError(
            f"{path}: the model needs about {need / GIB:.1f} GiB on {device} ({str(dtype).removeprefix('torch.')}"
            f"{f', per tensor-parallel rank of {tp_size}' if tp_size > 1 else ''}), more than the "
            f"{total / GIB:.1f} GiB it has; the largest part is {largest}: {parts[largest] / GIB:.1f} GiB")
