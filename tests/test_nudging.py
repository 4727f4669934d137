"""The engine's nudged output equals sequential nudging (NUDGING.md section 2), token for token."""
from __future__ import annotations

import random

import pytest
import torch

from nudge_engine.engine import NudgeEngine
from nudge_engine.engine.sampling_params import NudgeParams, SamplingParams
from nudge_engine.model.tokenizer import Tokenizer

from reference import eos_ids, hf_greedy, hf_model, next_logits, sequential_nudging, word_start_table

GAMMAS = (0.0, 0.2, 0.4, 0.7, 1.5)
DRAFTS = (0, 1, 3, 8)
MAX_TOKENS = 14

# (base family, nudger family, tokenizer style): same family, different families sharing a tokenizer, both styles.
PAIRS = [
    ("llama", "llama", "bytelevel"),
    ("olmo2", "llama", "bytelevel"),
    ("llama3", "qwen2", "metaspace"),
]


def random_prompts(vocab_size: int, n: int, seed: int, special: int = 8) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(special, vocab_size) for _ in range(rng.randint(1, 40))] for _ in range(n)]


@pytest.fixture(scope="module", params=PAIRS, ids=lambda p: "-".join(p))
def pair(request, tiny_pair):
    base_family, nudger_family, style = request.param
    base, nudger = tiny_pair(base_family, nudger_family, style, agreement=0.6)
    engine = NudgeEngine(base, nudger, max_num_seqs=64)
    return base, nudger, engine


def expected(base, nudger, prompt, gamma, roa, max_tokens=MAX_TOKENS):
    """The reference reads word starts and end tokens from the model folders, not from the engine."""
    return sequential_nudging(base, nudger, prompt, prompt, gamma, roa, word_start_table(nudger), max_tokens,
                              eos_ids(base) | eos_ids(nudger))


def test_engine_equals_sequential_for_every_gamma_k_and_rule(pair, check_pools, draft_tally):
    """One mixed batch: every request has its own gamma, k and agreement rule."""
    base, nudger, engine = pair
    check_pools(engine)
    tally = draft_tally(engine)
    prompts = random_prompts(engine.base.config.vocab_size, 6, seed=1)
    # Fixed draft lengths, plus adaptive drafting (k is then the most a round drafts).
    cases = [(p, g, k, roa, False) for p in prompts[:3] for g in GAMMAS for k in DRAFTS for roa in (True, False)
             if roa or g in (0.4, 0.7)]
    cases += [(p, 0.4, k, True, adaptive) for p in prompts[3:] for k in DRAFTS for adaptive in (False, True)]
    random.Random(0).shuffle(cases)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    outs = engine.generate([c[0] for c in cases], params,
                           [NudgeParams(gamma=g, draft_tokens=k, resume_on_agreement=roa, adaptive_drafting=a)
                            for _, g, k, roa, a in cases])
    refs = {}
    nudged_somewhere = handed_back = 0
    for (prompt, gamma, k, roa, _), out in zip(cases, outs):
        key = (tuple(prompt), gamma, roa)
        if key not in refs:
            refs[key] = expected(base, nudger, prompt, gamma, roa)
        tokens, sources = refs[key]
        assert out.token_ids == tokens, f"gamma={gamma} k={k} roa={roa}"
        assert out.sources == sources, f"gamma={gamma} k={k} roa={roa}"
        nudged_somewhere += "nudger" in sources and "base" in sources
        handed_back += any(a == "nudger" and b == "base" for a, b in zip(sources, sources[1:]))
    # The cases must exercise handoffs both ways and BASE-mode drafts both accepted and corrected,
    # or the comparison proves little.
    assert nudged_somewhere >= 5 and handed_back >= 5
    assert tally.accepted >= 20 and tally.rejected >= 20 and tally.nudged >= 5, vars(tally)


def test_gamma_zero_is_base_greedy_and_above_one_is_nudger_greedy(pair, check_pools):
    base, nudger, engine = pair
    check_pools(engine)
    prompts = random_prompts(engine.base.config.vocab_size, 4, seed=2)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    for k in (0, 4):
        zero = engine.generate(prompts, params, NudgeParams(gamma=0.0, draft_tokens=k, adaptive_drafting=False))
        above = engine.generate(prompts, params, NudgeParams(gamma=1.5, draft_tokens=k, adaptive_drafting=False))
        # Without the agreement rule no token is even labelled as the base's.
        above_strict = engine.generate(prompts, params, NudgeParams(gamma=1.5, draft_tokens=k, adaptive_drafting=False,
                                                                    resume_on_agreement=False))
        if k > 0:   # gamma 0 is speculative decoding with the nudger as drafter: drafts really ran
            assert sum(o.drafted_tokens for o in zero) >= len(prompts) * 4 and sum(o.accepted_tokens for o in zero) > 0
        for p, z, a, s in zip(prompts, zero, above, above_strict):
            assert z.token_ids == hf_greedy(base, p, MAX_TOKENS, engine.eos_ids)
            assert set(z.sources) == {"base"}
            assert a.token_ids == s.token_ids == hf_greedy(nudger, p, MAX_TOKENS, engine.eos_ids)
            assert set(s.sources) == {"nudger"}


def test_small_pools_force_preemption_and_keep_outputs(tiny_pair, check_pools):
    """Preempted and recomputed requests still give exactly sequential nudging's output."""
    base, nudger = tiny_pair("llama", "llama", "bytelevel", agreement=0.6)
    small = NudgeEngine(base, nudger, num_blocks=12, max_num_batched_tokens=64)
    check_pools(small)
    prompts = random_prompts(small.base.config.vocab_size, 16, seed=3)
    params = SamplingParams(max_tokens=24, temperature=0)
    nudge = [NudgeParams(gamma=0.4, draft_tokens=k, adaptive_drafting=False) for k in (0, 2, 4, 8)] * 4
    got = small.generate(prompts, params, nudge)
    assert small.stats.preemptions > 0
    for prompt, out in zip(prompts, got):
        assert (out.token_ids, out.sources) == expected(base, nudger, prompt, 0.4, True, max_tokens=24)


def test_abort_mid_round_frees_both_models_blocks_and_spares_the_others(tiny_pair, check_pools):
    base, nudger = tiny_pair("llama", "llama", "bytelevel", agreement=0.6)
    engine = NudgeEngine(base, nudger)
    check_pools(engine)
    prompts = random_prompts(engine.base.config.vocab_size, 6, seed=4)
    params = SamplingParams(max_tokens=20, temperature=0)
    ids = [engine.add_request(p, params, NudgeParams(gamma=0.7, draft_tokens=4, adaptive_drafting=False))
           for p in prompts]
    results = {}
    for _ in range(3):
        results.update({r.id: r.result() for r in engine.step() if r.finished})
    assert engine.models[1].pool.num_free < engine.models[1].pool.num_blocks  # the nudger holds blocks
    for rid in ids[::2]:
        engine.abort(rid)
    while engine.has_unfinished():
        results.update({r.id: r.result() for r in engine.step() if r.finished})
    assert engine.pools_all_free()
    for rid, prompt in zip(ids[1::2], prompts[1::2]):
        out = results[rid]
        assert (out.token_ids, out.sources) == expected(base, nudger, prompt, 0.7, True, max_tokens=20)


def test_stream_closed_early_aborts(tiny_pair, check_pools):
    base, nudger = tiny_pair("llama", "llama", "bytelevel", agreement=0.6)
    engine = NudgeEngine(base, nudger)
    check_pools(engine)
    stream = engine.stream([10, 11, 12], SamplingParams(max_tokens=40, temperature=0), NudgeParams(gamma=0.7))
    next(stream)
    stream.close()
    assert engine.pools_all_free()


def test_different_tokenizers_take_the_cross_tokenizer_path(tiny_model):
    a = tiny_model("llama", "bytelevel")
    b = tiny_model("llama", "metaspace")
    assert NudgeEngine(a, b).pairing == "cross-tokenizer"   # tests/test_cross_tokenizer.py covers it


def test_word_start_table_follows_section_3(tiny_model, tiny_pair):
    """The engine's tables equal the reference's, which reads tokenizer.json with `tokenizers`."""
    for style in ("bytelevel", "metaspace"):
        folder = tiny_model("llama", style)
        want = word_start_table(folder)
        assert Tokenizer(folder).word_start_table() == want[:len(Tokenizer(folder).vocab)]
        assert any(want) and not all(want)
        engine = NudgeEngine(*tiny_pair("llama", "llama", style, agreement=0.6))
        assert engine.word_start.tolist() == want[:engine.word_start.shape[0]]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_logprobs_of_both_models_tokens_equal_transformers_on_the_writers_context(temperature, pair, check_pools):
    """Each token's logprob is the writer's: the base model's on base_prompt + y, the nudger's on
    nudger_prompt + y (raw logits, temperature 1), with the top-n of that same distribution."""
    base, nudger, engine = pair
    check_pools(engine)
    prompts = random_prompts(engine.base.config.vocab_size, 4, seed=5)
    params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=temperature, seed=i, logprobs=2, ignore_eos=True)
              for i in range(len(prompts))]
    nudge = [NudgeParams(gamma=g, draft_tokens=k, adaptive_drafting=False) for g, k in ((0.5, 0), (0.5, 3), (0.2, 1),
                                                                                         (0.2, 3))]
    outs = engine.generate(prompts, params, nudge)
    models = {"base": hf_model(base), "nudger": hf_model(nudger)}
    written = {"base": 0, "nudger": 0}
    for prompt, out in zip(prompts, outs):
        assert len(out.logprobs) == len(out.token_ids)
        for i, (tok, src, entry) in enumerate(zip(out.token_ids, out.sources, out.logprobs)):
            ref = torch.log_softmax(next_logits(models[src], prompt + out.token_ids[:i]).double(), -1)
            assert list(entry)[0] == tok
            for t, lp in entry.items():
                assert abs(lp - float(ref[t])) <= 1e-4 * max(1.0, abs(float(ref[t]))), (src, i, t)
            assert set(ref.topk(2).indices.tolist()) <= set(entry)
            written[src] += 1
    assert written["base"] >= 8 and written["nudger"] >= 8, written
