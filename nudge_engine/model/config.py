"""The fields of a Hugging Face `config.json` that the layers need, read once at load time."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ModelFolderError
from .limits import check_sizes


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    scaling: dict | None  # HF rope_scaling / rope_parameters minus theta; None for plain RoPE


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    norm_eps: float
    rope: RopeConfig
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    raw: dict[str, Any] = field(repr=False, compare=False)

    def get(self, key: str, default: Any = None) -> Any:
        """A family-specific field (clip_qkv, softcapping, ...) straight from config.json."""
        value = self.raw.get(key, default)
        return default if value is None else value


def _as_id_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelFolderError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelFolderError(f"{path}: expected a JSON object")
    return data


def _rope_config(raw: dict) -> RopeConfig:
    # transformers 5 writes `rope_parameters` (theta inside); older configs `rope_theta` + `rope_scaling`.
    params = raw.get("rope_parameters") or {}
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    scaling = raw.get("rope_scaling") or {k: v for k, v in params.items() if k != "rope_theta"}
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if rope_type == "default":
        return RopeConfig(theta, None)
    if rope_type != "llama3":
        raise ModelFolderError(f"config.json: rope type {rope_type!r} is not supported (supported: default, llama3)")
    return RopeConfig(theta, dict(scaling))


DEFAULT_MAX_POSITIONS = 4096
DEFAULT_NORM_EPS = 1e-5


def load_config(folder: str | Path) -> ModelConfig:
    """From a model folder's config.json (+ generation_config.json), or from a .gguf file's metadata."""
    folder = Path(folder)
    if folder.suffix.lower() == ".gguf":
        from .gguf_checkpoint import config_dict  # imports gguf: only for .gguf paths
        raw = config_dict(folder)
        return config_from_raw(raw, folder, raw.get("eos_token_id"))
    path = folder / "config.json"
    if not path.is_file():
        raise ModelFolderError(f"{folder}: no config.json (expected a local Hugging Face model folder)")
    raw = _read_json(path)
    eos = raw.get("eos_token_id")
    gen_path = folder / "generation_config.json"
    if gen_path.is_file():
        gen = _read_json(gen_path)
        eos = gen.get("eos_token_id", eos)
    return config_from_raw(raw, path, eos)


def config_from_raw(raw: dict, path: Path, eos: Any) -> ModelConfig:
    archs = raw.get("architectures") or []
    if not archs:
        raise ModelFolderError(f"{path}: field 'architectures' is missing or empty")

    def number(key: str, kind: type, default: Any = None) -> Any:
        """A positive int / float field, named with the file when it is missing or not a number."""
        value = raw.get(key)
        if value is None:
            if default is None:
                raise ModelFolderError(f"{path}: required field {key!r} is missing")
            return default
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
              and (kind is float or float(value).is_integer()) and value > 0)
        if not ok:
            raise ModelFolderError(f"{path}: field {key!r} must be a positive {kind.__name__}, got {value!r}")
        return kind(value)

    def need(key: str) -> int:
        return number(key, int)

    num_heads = need("num_attention_heads")
    hidden = need("hidden_size")
    config = ModelConfig(
        architecture=archs[0],
        vocab_size=need("vocab_size"),
        hidden_size=hidden,
        intermediate_size=need("intermediate_size"),
        num_layers=need("num_hidden_layers"),
        num_heads=num_heads,
        num_kv_heads=number("num_key_value_heads", int, num_heads),
        head_dim=number("head_dim", int, hidden // num_heads),
        max_position_embeddings=number("max_position_embeddings", int, DEFAULT_MAX_POSITIONS),
        norm_eps=number("rms_norm_eps", float) if raw.get("rms_norm_eps") is not None
        else number("layer_norm_eps", float, DEFAULT_NORM_EPS),
        rope=_rope_config(raw),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        eos_token_ids=_as_id_tuple(eos),
        bos_token_id=raw.get("bos_token_id"),
        raw=raw,
    )
    check_sizes(config, path)   # limits.py: before anything is built from these sizes
    if not (math.isfinite(config.rope.theta) and config.rope.theta > 0):
        raise ModelFolderError(f"{path}: field 'rope_theta' must be a positive number, got {config.rope.theta}")
    return config
