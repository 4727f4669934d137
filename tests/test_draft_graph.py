"""The nudger's draft passes 2..k as one captured graph (model/draft_graph.py) on the CPU's replay
emulation: the same tokens and sources as the per-pass loop and as the eager engine, for every padded
batch size, with preemption; and the passes really ran as one replay."""
from __future__ import annotations

import pytest
import torch

from nudge_engine.engine import NudgeEngine
from nudge_engine.engine.sampling_params import NudgeParams, SamplingParams
from test_graph_runner import prompts_for

MAX_NUM_SEQS = 8
NUM_BLOCKS = 14   # 8 requests of ~4 blocks each do not fit: the scheduler preempts


@pytest.fixture(scope="module")
def engines(tiny_pair):
    base, nudger = tiny_pair("llama", "llama", "bytelevel", agreement=0.7)
    made = {name: NudgeEngine(base, nudger, max_num_seqs=MAX_NUM_SEQS, enforce_eager=eager, draft_tokens=8,
                              num_blocks=NUM_BLOCKS)
            for name, eager in (("eager", True), ("loop", False), ("fused", False))}
    made["loop"].nudger.draft_graphs = None   # graphs for every pass, one replay each
    assert made["fused"].nudger.draft_graphs is not None and made["eager"].nudger.draft_graphs is None
    return made


def test_fused_draft_passes_equal_the_loop_and_eager(engines, check_pools):
    for e in engines.values():
        check_pools(e)
    fused = engines["fused"].nudger.draft_graphs
    vocab = engines["eager"].base.config.vocab_size
    for k in (1, 3, 8):
        for n in (1, 2, 3, 5, 8):   # pads to 1, 2, 4, 8, 8
            prompts = prompts_for(vocab, n, seed=100 * k + n)
            params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
            nudge = NudgeParams(gamma=0.35, draft_tokens=k, adaptive_drafting=False)
            got = {name: [(o.token_ids, o.sources) for o in e.generate(prompts, params, nudge)]
                   for name, e in engines.items()}
            assert got["fused"] == got["loop"] == got["eager"], f"k={k} n={n}"
    sizes = {bs for bs, _ in fused.replays}
    steps = {s for _, s in fused.replays}
    assert sizes == {1, 2, 4, 8} and {2, 7} <= steps, fused.replays   # every padded size; k = 3 and 8
    assert engines["fused"].stats.preemptions > 0 and engines["fused"].stats.nudger_tokens > 0


def test_the_further_passes_are_one_replay_not_k_python_passes(engines, check_pools, monkeypatch):
    """Same generation on the loop and the fused engine: the fused one calls the nudger's forward once
    per drafting round (its first pass), and its replays make up exactly the passes it saved."""
    calls = {}
    for name in ("loop", "fused"):
        e = engines[name]
        check_pools(e)
        real = e.nudger.forward

        def counted(*a, _real=real, _name=name, **kw):
            calls[_name] = calls.get(_name, 0) + 1
            return _real(*a, **kw)
        monkeypatch.setattr(e.nudger, "forward", counted)
    fused = engines["fused"].nudger.draft_graphs
    before = dict(fused.replays)
    prompts = prompts_for(engines["loop"].base.config.vocab_size, 4, seed=7)
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    nudge = NudgeParams(gamma=0.0, draft_tokens=4, adaptive_drafting=False)   # gamma 0: every round drafts 4
    outs = {name: [o.token_ids for o in engines[name].generate(prompts, params, nudge)] for name in ("loop", "fused")}
    assert outs["loop"] == outs["fused"]
    saved = sum(steps * (count - before.get((bs, steps), 0)) for (bs, steps), count in fused.replays.items())
    assert saved > 0 and calls["fused"] + saved == calls["loop"]
    assert calls["fused"] < calls["loop"] / 2


def test_a_fused_draft_graph_run_on_its_whole_padded_shape_writes_no_kv_for_padded_rows(tiny_pair, check_pools):
    """As a GPU runs it: every step computes all padded rows. Those write no K/V (PAD_SLOT): the slots
    written are exactly the eager engine's, and the live rows' tokens are the eager ones."""
    from nudge_engine.model.draft_graph import attach_draft_graphs
    from nudge_engine.model.graph_runner import ReplayCapture
    base, nudger = tiny_pair("llama", "llama", "bytelevel", agreement=0.7)
    eager = NudgeEngine(base, nudger, max_num_seqs=MAX_NUM_SEQS, enforce_eager=True, num_blocks=64)
    padded = NudgeEngine(base, nudger, max_num_seqs=MAX_NUM_SEQS, enforce_eager=False, draft_tokens=8, num_blocks=64)
    padded.nudger.graphs.capture_impl = ReplayCapture(padded=True)
    attach_draft_graphs(padded.nudger, 8)
    written = {}
    for name, e in (("eager", eager), ("padded", padded)):
        check_pools(e)
        e.nudger.runner.kv_cache.zero_()
        prompts = prompts_for(e.base.config.vocab_size, 3, seed=11)   # 3 live rows of a padded 4
        outs = e.generate(prompts, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True),
                          NudgeParams(gamma=0.0, draft_tokens=8, adaptive_drafting=False))
        kv = e.nudger.runner.kv_cache.clone()
        slots = kv[:, 0].flatten(3).abs().sum((0, 3)) != 0   # [num_blocks, block_size]
        written[name] = (slots.nonzero().tolist(), [o.token_ids for o in outs], kv)
    assert sum(steps * n for (bs, steps), n in padded.nudger.draft_graphs.replays.items() if bs == 4) > 0
    assert written["padded"][:2] == written["eager"][:2]
    assert torch.allclose(written["padded"][2], written["eager"][2], atol=1e-4)   # nothing overwritten
