"""The engine's nudged output equals sequential nudging (NUDGING.md section 2), token for token."""
from __future__ import annotations

import random

import pytest

from nudge_engine.engine import NudgeEngine
from nudge_engine.sampling_params import NudgeParams, SamplingParams
from nudge_engine.tokenizer import Tokenizer

from reference import hf_greedy, sequential_nudging

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


def expected(base, nudger, engine, prompt, gamma, roa):
    ws = engine.word_start.tolist()
    return sequential_nudging(base, nudger, prompt, prompt, gamma, roa, ws, MAX_TOKENS, engine.eos_ids)


def test_engine_equals_sequential_for_every_gamma_k_and_rule(pair, check_pools):
    """One mixed batch: every request has its own gamma, k and agreement rule."""
    base, nudger, engine = pair
    check_pools(engine)
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
            refs[key] = expected(base, nudger, engine, prompt, gamma, roa)
        tokens, sources = refs[key]
        assert out.token_ids == tokens, f"gamma={gamma} k={k} roa={roa}"
        assert out.sources == sources, f"gamma={gamma} k={k} roa={roa}"
        nudged_somewhere += "nudger" in sources and "base" in sources
        handed_back += any(a == "nudger" and b == "base" for a, b in zip(sources, sources[1:]))
    # The cases must exercise handoffs both ways, or the comparison proves little.
    assert nudged_somewhere >= 5 and handed_back >= 5


def test_gamma_zero_is_base_greedy_and_above_one_is_nudger_greedy(pair, check_pools):
    base, nudger, engine = pair
    check_pools(engine)
    prompts = random_prompts(engine.base.config.vocab_size, 4, seed=2)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    for k in (0, 4):
        zero = engine.generate(prompts, params, NudgeParams(gamma=0.0, draft_tokens=k))
        above = engine.generate(prompts, params, NudgeParams(gamma=1.5, draft_tokens=k))
        # Without the agreement rule no token is even labelled as the base's.
        above_strict = engine.generate(prompts, params,
                                       NudgeParams(gamma=1.5, draft_tokens=k, resume_on_agreement=False))
        for p, z, a, s in zip(prompts, zero, above, above_strict):
            assert z.token_ids == hf_greedy(base, p, MAX_TOKENS, engine.eos_ids)
            assert set(z.sources) == {"base"}
            assert a.token_ids == s.token_ids == hf_greedy(nudger, p, MAX_TOKENS, engine.eos_ids)
            assert set(s.sources) == {"nudger"}


def test_small_pools_force_preemption_and_keep_outputs(tiny_pair, check_pools):
    base, nudger = tiny_pair("llama", "llama", "bytelevel", agreement=0.6)
    big = NudgeEngine(base, nudger)
    small = NudgeEngine(base, nudger, num_blocks=12, max_num_batched_tokens=64)
    check_pools(big)
    check_pools(small)
    prompts = random_prompts(big.base.config.vocab_size, 16, seed=3)
    params = SamplingParams(max_tokens=24, temperature=0)
    nudge = [NudgeParams(draft_tokens=k, adaptive_drafting=k != 8) for k in (0, 2, 4, 8)] * 4
    want = big.generate(prompts, params, nudge)
    got = small.generate(prompts, params, nudge)
    assert small.stats.preemptions > 0
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert [o.sources for o in got] == [o.sources for o in want]


def test_abort_mid_round_frees_both_models_blocks(tiny_pair, check_pools):
    base, nudger = tiny_pair("llama", "llama", "bytelevel", agreement=0.6)
    engine = NudgeEngine(base, nudger)
    check_pools(engine)
    ids = [engine.add_request(p, SamplingParams(max_tokens=50, temperature=0), NudgeParams(gamma=0.7, draft_tokens=4))
           for p in random_prompts(engine.base.config.vocab_size, 4, seed=4)]
    for _ in range(3):
        engine.step()
    assert engine.models[1].pool.num_free < engine.models[1].pool.num_blocks  # the nudger holds blocks
    for rid in ids:
        engine.abort(rid)
    assert engine.pools_all_free()


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


def test_word_start_table_follows_section_3(tiny_model):
    for style in ("bytelevel", "metaspace"):
        tok = Tokenizer(tiny_model("llama", style))
        table = tok.word_start_table()
        for piece, tid in tok.vocab.items():
            expect = (tid in tok.special_ids or piece[:1] in ("Ġ", "Ċ", "ĉ", "▁")
                      or piece in ("<0x09>", "<0x0A>", "<0x0D>", "<0x20>") or piece[:1].isspace())
            assert table[tid] == expect, piece
        assert any(table) and not all(table)
