"""One host read per decode round (pairing/host_read.py): the drafts stay on the device, the walk's
packed result (with the drafts' values) is the round's one device-to-host transfer.

What a prefill chunk costs: a non-final chunk reads nothing (no walk runs); the final chunk is
the request's first round and reads once, like any decode round; the logprobs of written tokens ride
in that read. Counted extra, and kept out of these generations: prompt logprobs (one read per prefill
chunk that holds prompt rows), and a round whose requests both sample and decide greedily (one read
per walk kind)."""
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


@pytest.mark.parametrize("logprobs", [None, 3])
@pytest.mark.parametrize("enforce_eager", [True, False])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_host_reads_at_most_one_per_round(tiny_pair, check_pools, enforce_eager, temperature, logprobs):
    base, nudger = tiny_pair("llama", "llama", "bytelevel", agreement=0.6)
    # Prompts longer than the token budget: several non-final prefill chunks that must read nothing.
    engine = NudgeEngine(base, nudger, max_num_seqs=4, max_num_batched_tokens=16, enforce_eager=enforce_eager)
    check_pools(engine)
    prompts = prompts_for(engine.base.config.vocab_size, 1, seed=4)
    rid = engine.add_request(prompts[0], SamplingParams(max_tokens=24, temperature=temperature, seed=1,
                                                        logprobs=logprobs),
                             NudgeParams(gamma=0.4, draft_tokens=3))
    req = engine.requests[rid]
    per_step, drafted = [], 0
    while engine.has_unfinished():
        reads, rounds = engine.stats.host_reads, engine.stats.rounds
        engine.step()
        per_step.append((engine.stats.host_reads - reads, engine.stats.rounds - rounds))
    assert engine.stats.drafted_tokens > 0 and engine.stats.nudger_tokens > 0   # drafts and nudges ran
    assert all(r <= d for r, d in per_step), per_step          # a chunk without a round reads nothing
    assert any(d == 0 for _, d in per_step)                    # ... and there were such chunks
    assert engine.stats.host_reads <= engine.stats.rounds
    if logprobs is not None:   # they came, one entry per token (the token first, then the top 3), in that read
        assert len(req.logprobs) == len(req.output) == 24
        assert all(next(iter(e)) == t and 3 <= len(e) <= 4 for e, t in zip(req.logprobs, req.output))


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


@pytest.mark.parametrize("temperature,logprobs", [(0.0, None), (0.8, 2)])
def test_the_text_path_reads_only_through_host_read_and_within_its_bound(tiny_model, check_pools, monkeypatch,
                                                                         temperature, logprobs):
    """The cross-tokenizer text path (pairing/text*.py) decides on the host, pass by pass: every read
    it makes goes through host_read (so engine.stats.host_reads counts it), and greedy without
    logprobs it reads once per model pass. Sampling adds one read per sampled row (rejected draft
    rows too) and logprobs one per written token: here that stays under passes + 5 x written tokens."""
    base, nudger = tiny_model("llama", "bytelevel"), tiny_model("llama3", "metaspace")
    engine = NudgeEngine(base, nudger, max_num_seqs=4)
    check_pools(engine)
    assert engine._pair.name != "same-tokenizer"
    passes = {"n": 0}
    for model in engine.models:
        real_forward = model.forward

        def counted(*a, _real=real_forward, **kw):
            passes["n"] += 1
            return _real(*a, **kw)
        monkeypatch.setattr(model, "forward", counted)
    unrouted = []   # reads the text modules make themselves (host_read hands over host tensors as they are)

    def wrap(name):
        real = getattr(torch.Tensor, name)

        def spy(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if os.path.basename(caller).startswith("text") and caller.startswith(PACKAGE):
                unrouted.append(f"{name} from {os.path.relpath(caller, PACKAGE)}:{sys._getframe(1).f_lineno}")
            return real(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, spy)
    for name in ("cpu", "item", "numpy", "to"):
        wrap(name)
    counted_reads = {"n": 0}
    real_read = host_read_module.host_read

    def spy_read(t):
        counted_reads["n"] += 1
        return real_read(t)
    for module in ("nudge_engine.pairing.text", "nudge_engine.pairing.text_sampling",
                   "nudge_engine.pairing.text_logprobs"):
        monkeypatch.setattr(sys.modules[module], "host_read", spy_read)
    reads = engine.stats.host_reads
    outs = engine.generate(["The cat sat on the", "A story about"],
                           SamplingParams(max_tokens=20, temperature=temperature, seed=3, logprobs=logprobs,
                                          ignore_eos=True),
                           NudgeParams(gamma=0.4, draft_tokens=2))
    written = sum(len(o.token_ids) for o in outs)
    assert not unrouted, unrouted[:5]
    assert counted_reads["n"] > 0 and engine.stats.host_reads - reads >= counted_reads["n"]
    if temperature == 0 and logprobs is None:
        assert engine.stats.host_reads - reads <= passes["n"]
    else:
        assert engine.stats.host_reads - reads <= passes["n"] + 5 * written
