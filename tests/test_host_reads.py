"""One host read per decode round (pairing/host_read.py): the drafts stay on the device, the walk's
packed result (with the drafts' values) is the round's one device-to-host transfer.

What a prefill chunk costs: a non-final chunk reads nothing (no walk runs); the final chunk is
the request's first round and reads once, like any decode round. Counted extra, and kept out of
these generations: logprobs and prompt logprobs (one read per row), and a round whose requests
both sample and decide greedily (one read per walk kind)."""
from __future__ import annotations

import os
import random
import sys

import pytest
import torch

from nudge_engine.engine import NudgeEngine
from nudge_engine.engine.sampling_params import NudgeParams, SamplingParams
from nudge_engine.pairing import host_read as host_read_module

PACKAGE = os.path.dirname(os.path.dirname(host_read_module.__file__))   # nudge_engine/
READS = ("tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


def prompts_for(vocab: int, n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(8, vocab) for _ in range(rng.randint(20, 40))] for _ in range(n)]


@pytest.mark.parametrize("enforce_eager", [True, False])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_host_reads_at_most_one_per_round(tiny_pair, check_pools, enforce_eager, temperature):
    base, nudger = tiny_pair("llama", "llama", "bytelevel", agreement=0.6)
    # Prompts longer than the token budget: several non-final prefill chunks that must read nothing.
    engine = NudgeEngine(base, nudger, max_num_seqs=4, max_num_batched_tokens=16, enforce_eager=enforce_eager)
    check_pools(engine)
    prompts = prompts_for(engine.base.config.vocab_size, 1, seed=4)
    engine.add_request(prompts[0], SamplingParams(max_tokens=24, temperature=temperature, seed=1),
                       NudgeParams(gamma=0.4, draft_tokens=3))
    per_step, drafted = [], 0
    while engine.has_unfinished():
        reads, rounds = engine.stats.host_reads, engine.stats.rounds
        engine.step()
        per_step.append((engine.stats.host_reads - reads, engine.stats.rounds - rounds))
    assert engine.stats.drafted_tokens > 0 and engine.stats.nudger_tokens > 0   # drafts and nudges ran
    assert all(r <= d for r, d in per_step), per_step          # a chunk without a round reads nothing
    assert any(d == 0 for _, d in per_step)                    # ... and there were such chunks
    assert engine.stats.host_reads <= engine.stats.rounds


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_no_read_in_a_round_before_the_walk(tiny_pair, check_pools, monkeypatch, temperature):
    """A spy on every tensor-to-Python read from the engine's own code: none happens in a round
    before its host_read (drafting, sampling drafts, verify, placeholders, graph inputs all stay
    on the device). Not spied: layers/ (the torch attention backend plans on the host, the CPU's
    backend; the Triton backend plans without reading). On a GPU, benchmarks/sync_report.py
    checks the draft loop with torch.cuda.set_sync_debug_mode."""
    base, nudger = tiny_pair("llama", "llama", "bytelevel", agreement=0.6)
    engine = NudgeEngine(base, nudger, max_num_seqs=4, enforce_eager=False)
    check_pools(engine)
    state = {"walked": True, "early": []}
    real_read = host_read_module.host_read

    def spy_read(t):
        state["walked"] = True
        return real_read(t)

    for module in ("nudge_engine.pairing.handoff", "nudge_engine.pairing.token"):
        monkeypatch.setattr(sys.modules[module], "host_read", spy_read)

    def wrap(name):
        real = getattr(torch.Tensor, name)

        def spy(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if not state["walked"] and caller.startswith(PACKAGE) and "layers" not in caller:
                state["early"].append(f"{name} from {os.path.relpath(caller, PACKAGE)}:{sys._getframe(1).f_lineno}")
            return real(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, spy)

    for name in READS:
        wrap(name)
    prompts = prompts_for(engine.base.config.vocab_size, 3, seed=5)
    for p in prompts:
        engine.add_request(p, SamplingParams(max_tokens=16, temperature=temperature, seed=2), NudgeParams(gamma=0.4, draft_tokens=3))
    steps = 0
    while engine.has_unfinished():
        state["walked"] = False
        engine.step()
        steps += 1
    assert steps > 5 and engine.stats.drafted_tokens > 0
    assert not state["early"], state["early"][:10]


def test_sequence_overwrite_replaces_placeholders_in_place():
    """Sequence.overwrite (csrc/sequence.cpp): the drafts' values over their placeholders, with the
    blocks and num_computed untouched; out of range or invalid tokens raise and change nothing."""
    from nudge_engine import _core
    pool = _core.BlockPool(4, 4)
    seq = _core.Sequence(pool)
    seq.append([7, 8, 9, 0, 0])
    assert seq.reserve(5)
    seq.set_num_computed(5)
    table = list(seq.block_table)
    seq.overwrite(3, [11, 12])
    assert list(seq.tokens) == [7, 8, 9, 11, 12] and list(seq.block_table) == table and seq.num_computed == 5
    for start, tokens in ((4, [1, 2]), (-1, [1]), (0, [-3])):
        with pytest.raises(ValueError):
            seq.overwrite(start, tokens)
    assert list(seq.tokens) == [7, 8, 9, 11, 12]
    seq.release()
    assert pool.all_free()
