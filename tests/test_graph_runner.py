"""Decode graphs (model/graph_runner.py) on the CPU: the replay emulation gives the eager engine's
tokens and sources exactly, and a padded replay writes no K/V for padded rows."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from nudge_engine import _core
from nudge_engine.engine import NudgeEngine
from nudge_engine.engine.sampling_params import NudgeParams, SamplingParams
from nudge_engine.model.graph_runner import CPU_GRAPHS_ENV, PAD_SLOT, GraphRunner, ReplayCapture, capture_batch_sizes, graph_mode

MAX_NUM_SEQS = 8          # padded sizes 1, 2, 4, 8: every one is replayed below
MAX_TOKENS = 10


def prompts_for(vocab: int, n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(8, vocab) for _ in range(rng.randint(1, 30))] for _ in range(n)]


def test_capture_batch_sizes_and_the_switch():
    assert capture_batch_sizes(1) == [1]
    assert capture_batch_sizes(8) == [1, 2, 4, 8]
    assert capture_batch_sizes(20) == [1, 2, 4, 8, 16, 32]
    assert capture_batch_sizes(256)[-3:] == [224, 240, 256]
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert graph_mode(None, cpu) == "eager" and graph_mode(None, cuda) == "cuda"
    assert graph_mode(False, cpu) == "replay" and graph_mode(True, cuda) == "eager"


def test_the_environment_hook_runs_the_cpu_engine_under_replay(monkeypatch):
    monkeypatch.setenv(CPU_GRAPHS_ENV, "replay")
    assert graph_mode(None, torch.device("cpu")) == "replay" and graph_mode(True, torch.device("cpu")) == "eager"


# NUDGING.md's exactness tests (tests/reference.py's sequential nudging) under the replay emulation.
from test_nudging import (  # noqa: E402
    test_engine_equals_sequential_for_every_gamma_k_and_rule as test_sequential_exactness_under_replay,
    test_gamma_zero_is_base_greedy_and_above_one_is_nudger_greedy as test_gamma_limits_under_replay,
)


@pytest.fixture(scope="module")
def pair(tiny_pair):
    base, nudger = tiny_pair("llama", "llama", "bytelevel", agreement=0.6)
    return base, nudger, NudgeEngine(base, nudger, max_num_seqs=64, enforce_eager=False)


@pytest.fixture(scope="module")
def engines(tiny_pair):
    base, nudger = tiny_pair("llama", "llama", "bytelevel", agreement=0.6)
    eager = NudgeEngine(base, nudger, max_num_seqs=MAX_NUM_SEQS, enforce_eager=True, draft_tokens=8)
    replay = NudgeEngine(base, nudger, max_num_seqs=MAX_NUM_SEQS, enforce_eager=False, draft_tokens=8)
    assert eager.base.graphs is None and replay.base.graphs is not None
    return eager, replay


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_replay_equals_eager_for_every_padded_size_and_k(engines, check_pools, temperature):
    eager, replay = engines
    check_pools(eager)
    check_pools(replay)
    vocab = eager.base.config.vocab_size
    for k in (0, 1, 3, 8):
        for n in (1, 2, 3, 5, 8):   # pads to 1, 2, 4, 8, 8
            prompts = prompts_for(vocab, n, seed=10 * k + n)
            params = SamplingParams(max_tokens=MAX_TOKENS, temperature=temperature, seed=k)
            nudge = NudgeParams(gamma=0.4, draft_tokens=k, adaptive_drafting=False)
            want = [(o.token_ids, o.sources) for o in eager.generate(prompts, params, nudge)]
            got = [(o.token_ids, o.sources) for o in replay.generate(prompts, params, nudge)]
            assert got == want, f"k={k} n={n} temperature={temperature}"
    # Every padded size ran from a graph, in both models, and the verify pass (q = k + 1) too.
    base_keys, nudger_keys = set(replay.base.graphs.replays), set(replay.nudger.graphs.replays)
    assert {bs for bs, q in nudger_keys} == {1, 2, 4, 8}
    assert {bs for bs, q in base_keys} == {1, 2, 4, 8}
    assert {q for bs, q in base_keys} >= {1, 2, 4, 9}


def test_replay_equals_eager_with_preemption(tiny_pair, check_pools):
    base, nudger = tiny_pair("llama", "llama", "bytelevel", agreement=0.6)
    out = {}
    for enforce_eager in (True, False):
        engine = NudgeEngine(base, nudger, num_blocks=12, max_num_batched_tokens=64, max_num_seqs=MAX_NUM_SEQS,
                             enforce_eager=enforce_eager)
        check_pools(engine)
        prompts = prompts_for(engine.base.config.vocab_size, 12, seed=3)
        nudge = [NudgeParams(gamma=0.4, draft_tokens=k, adaptive_drafting=False) for k in (0, 1, 3, 4)] * 3
        got = engine.generate(prompts, SamplingParams(max_tokens=20, temperature=0), nudge)
        assert engine.stats.preemptions > 0
        out[enforce_eager] = [(o.token_ids, o.sources) for o in got]
    assert out[True] == out[False]


def _decode_batch(engine, num_seqs: int, q: int):
    """num_seqs sequences of random lengths with q pending tokens each (a decode-shaped pass)."""
    model = engine.base
    rng = random.Random(num_seqs * 7 + q)
    seqs = []
    for _ in range(num_seqs):
        seq = _core.Sequence(model.pool)
        n = rng.randint(q + 1, 40)
        seq.append([rng.randrange(8, model.config.vocab_size) for _ in range(n)])
        assert seq.reserve(n)
        seqs.append(seq)
    # Earlier tokens computed eagerly (a prefill), so the pass reads real context.
    model.forward(seqs, [s.num_tokens - q for s in seqs])
    for s in seqs:
        s.set_num_computed(s.num_tokens - q)
    return seqs


@pytest.mark.parametrize("num_seqs,q", [(3, 1), (5, 4), (1, 2)])
def test_padded_replay_writes_no_kv_for_padded_rows_and_matches_eager(engines, num_seqs, q):
    """The GPU's shape: the whole padded batch runs. Padded rows store nothing (PAD_SLOT) and the
    live rows' logits and K/V equal the eager pass's (within the CPU GEMMs' rounding)."""
    eager = engines[0]
    model = eager.base
    graphs = GraphRunner(model.runner, MAX_NUM_SEQS, [q], ReplayCapture(padded=True), 512 // model.runner.block_size)
    graphs.capture_all()
    seqs = _decode_batch(eager, num_seqs, q)
    try:
        batch = _core.build_batch(seqs, [q] * num_seqs, model.runner.block_size)
        key = graphs.padded_size(batch)
        assert key == (next(s for s in graphs.sizes if s >= num_seqs), q)
        cache = model.runner.kv_cache
        before = cache.clone()
        got = graphs.run(batch, key, None)
        after_graph = cache.clone()
        assert (graphs.slot_mapping[num_seqs * q:key[0] * q] == PAD_SLOT).all()
        cache.copy_(before)
        want = model.forward(seqs, [q] * num_seqs)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(after_graph, cache, rtol=1e-5, atol=1e-5)
        # Only the live rows' slots changed.
        written = np.asarray(batch.slot_mapping)
        flat_before = before.view(*before.shape[:2], -1, *before.shape[-2:])
        flat_after = after_graph.view_as(flat_before)
        changed = (flat_before != flat_after).flatten(3).any(-1).any(0).any(0).nonzero().flatten().tolist()
        assert set(changed) <= set(written.tolist())
    finally:
        for s in seqs:
            s.release()
        assert model.pool.all_free()


def test_enforce_eager_flag_reaches_the_engine(tiny_pair, monkeypatch):
    from nudge_engine import cli
    base, nudger = tiny_pair("llama", "llama", "bytelevel", agreement=0.6)
    for flag, want in (([], None), (["--enforce-eager"], True)):
        args = cli.build_parser().parse_args(["generate", "--base", str(base), "--nudger", str(nudger),
                                              "--prompt", "hi", *flag])
        seen = {}
        monkeypatch.setattr("nudge_engine.engine.engine.NudgeEngine.__init__",
                            lambda self, *a, **kw: seen.update(kw))
        cli._make_engine(args)
        assert seen["enforce_eager"] is want
