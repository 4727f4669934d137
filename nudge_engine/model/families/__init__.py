"""Model registry keyed by config.json's `architectures[0]`."""
from __future__ import annotations

from typing import Callable

from ..config import ModelConfig
from ..errors import ModelFolderError
from .gemma2 import gemma2_arch
from .llama import llama_arch, qwen2_arch
from .olmo import olmo2_arch, olmo_arch
from .transformer import ArchSpec, CausalLM

REGISTRY: dict[str, Callable[[ModelConfig], ArchSpec]] = {
    "LlamaForCausalLM": llama_arch,
    "Qwen2ForCausalLM": qwen2_arch,
    "Gemma2ForCausalLM": gemma2_arch,
    "OlmoForCausalLM": olmo_arch,
    "Olmo2ForCausalLM": olmo2_arch,
}


def build_model(config: ModelConfig) -> CausalLM:
    arch_fn = REGISTRY.get(config.architecture)
    if arch_fn is None:
        raise ModelFolderError(
            f"config.json: architecture {config.architecture!r} is not supported "
            f"(supported: {', '.join(sorted(REGISTRY))})"
        )
    return CausalLM(config, arch_fn(config))


__all__ = ["REGISTRY", "build_model", "CausalLM", "ArchSpec"]
