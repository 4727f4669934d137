"""Prefix caching through the engine: the same outputs with the cache on and off (both pairings, greedy and
seeded sampling, shared and unshared prefixes, a pool small enough to evict and preempt, chunked prefill),
real hits that really save prefill work, prompt logprobs, the switch and the metrics."""
from __future__ import annotations

import types

import pytest

from nudge_engine import cli
from nudge_engine.engine import NudgeEngine
from nudge_engine.engine.async_engine import EngineSnapshot
from nudge_engine.engine.sampling_params import NudgeParams, SamplingParams

SHARED = "You are a careful assistant. Answer briefly, in plain words.\nQ: "     # ~60 tokens: 7 blocks of 8
QUESTIONS = ["where is the sea?", "why?", "where is the sea?", "what is a fox", "x"]
UNSHARED = ["Once upon a time there was a king", "zz", "The quick brown fox jumps over the lazy dog"]
BLOCK = 8


def _waves():
    """Two waves: the second finds the first's blocks cached (or evicted: the pool is small)."""
    first = [SHARED + q for q in QUESTIONS[:3]] + UNSHARED[:2]
    second = [SHARED + q for q in QUESTIONS[2:]] + UNSHARED[1:] + [SHARED + QUESTIONS[0]]
    return first, second


def _params(prompts, sampled: bool, logprobs_at=()):
    return [SamplingParams(max_tokens=12, ignore_eos=True, temperature=0.9 if sampled else 0.0, seed=100 + i,
                           prompt_logprobs=2 if i in logprobs_at else None) for i in range(len(prompts))]


def _run(engine, sampled: bool, key):
    outs = []
    for wave in _waves():
        nudge = [NudgeParams(gamma=g, draft_tokens=k) for g, k in zip((0.4, 0.2, 0.6, 0.4, 0.3, 0.5, 0.4),
                                                                       (4, 1, 0, 2, 4, 3, 4))][:len(wave)]
        outs += [key(o) for o in engine.generate(wave, _params(wave, sampled, logprobs_at=(1,)), nudge)]
    return outs


def _pair_engines(base, nudger, check_pools, **kw):
    engines = [NudgeEngine(base, nudger, block_size=BLOCK, enable_prefix_caching=on, **kw) for on in (False, True)]
    for e in engines:
        check_pools(e)
    return engines


def _prompt_lp(o):
    return None if o.prompt_logprobs is None else [
        None if e is None else {t: round(v, 4) for t, v in e.items()} for e in o.prompt_logprobs]


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded"])
def test_token_path_same_outputs_with_cache_on_and_off_under_eviction_and_preemption(sampled, tiny_pair, check_pools):
    base, nudger = tiny_pair("llama", "llama", "bytelevel", 0.5)
    off, on = _pair_engines(base, nudger, check_pools, num_blocks=16, max_num_batched_tokens=40)
    assert on.pairing == "same-tokenizer"
    key = lambda o: (o.token_ids, o.sources, _prompt_lp(o), len(o.prompt_token_ids))   # noqa: E731
    want, got = _run(off, sampled, key), _run(on, sampled, key)
    assert got == want
    assert any(src == "nudger" for _, sources, _, _ in got for src in sources)
    assert on.stats.preemptions > 0
    for m in on.models:
        assert m.pool.prefix_cache_hit_tokens > 0 and m.pool.prefix_cache_evictions > 0, m.pool
    assert all(m.pool.prefix_cache_hit_tokens == 0 and m.pool.num_cached == 0 for m in off.models)
    # The requests with prompt logprobs (one per wave) got one entry per prompt token, preempted or not.
    assert [len(lp) == n for _, _, lp, n in got if lp is not None] == [True, True]


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded"])
def test_text_path_same_outputs_with_cache_on_and_off_under_eviction_and_preemption(sampled, tiny_model, check_pools):
    base, nudger = tiny_model("llama", "bytelevel"), tiny_model("llama3", "metaspace")
    off, on = _pair_engines(base, nudger, check_pools, num_blocks=18, max_num_batched_tokens=40)
    assert on.pairing == "cross-tokenizer"
    key = lambda o: (o.text, o.spans, o.token_ids)   # noqa: E731

    def run(engine):
        outs = []
        for wave in _waves():
            outs += [key(o) for o in engine.generate(wave, _params(wave, sampled), NudgeParams(gamma=0.4))]
        return outs

    try:
        want = run(off)
    except ValueError as e:     # sampling on the text path arrives with issue 15; then this runs
        if "greedy only" not in str(e):
            raise
        for engine in (off, on):
            for rid in list(engine.requests):
                engine.abort(rid)
        pytest.skip("the text path is greedy only on this branch")
    got = run(on)
    assert got == want
    assert on.stats.preemptions > 0
    for m in on.models:
        assert m.pool.prefix_cache_hit_tokens > 0 and m.pool.prefix_cache_evictions > 0, m.pool


def _count_computed(engine) -> dict[str, int]:
    """Counts the tokens each model's forward computes (a spy: it changes nothing)."""
    counts = {}
    for name, m in zip(("base", "nudger"), engine.models):
        counts[name] = 0

        def spy(seqs, num_new, *args, _f=m.forward, _name=name, **kwargs):
            counts[_name] += sum(num_new)
            return _f(seqs, num_new, *args, **kwargs)

        m.forward = spy
    return counts


def test_hits_save_exactly_the_cached_prefill(tiny_pair, check_pools):
    base, nudger = tiny_pair("llama", "llama", "bytelevel", 0.5)
    off, on = _pair_engines(base, nudger, check_pools)
    prompts = [SHARED + q for q in QUESTIONS] * 2
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    computed = {}
    for engine in (off, on):
        counts = _count_computed(engine)
        engine.generate(prompts[:1], params)                  # warms the cache
        before = dict(counts)
        outs = engine.generate(prompts, params)
        computed[engine is on] = {k: counts[k] - before[k] for k in counts}, [o.token_ids for o in outs]
    (off_counts, off_out), (on_counts, on_out) = computed[False], computed[True]
    assert on_out == off_out
    for i, name in enumerate(("base", "nudger")):
        hits = on.models[i].pool.prefix_cache_hit_tokens
        assert hits >= len(prompts) * 16, (name, hits)          # every prompt found its shared blocks
        # The warm-up request's own lookup found nothing, so the hits are all this batch's: saved one for one.
        assert off_counts[name] - on_counts[name] == hits, (name, off_counts, on_counts, hits)
    assert 0 < on.models[0].pool.prefix_cache_hit_tokens < on.models[0].pool.prefix_cache_query_tokens


def test_prompt_logprobs_request_computes_its_whole_prompt(tiny_pair, check_pools):
    base, nudger = tiny_pair("llama", "llama", "bytelevel", 0.5)
    off, on = _pair_engines(base, nudger, check_pools)
    prompt = SHARED + QUESTIONS[0]
    on.generate(prompt, SamplingParams(max_tokens=2, temperature=0.0))
    hits = on.base.pool.prefix_cache_hit_tokens
    params = SamplingParams(max_tokens=4, temperature=0.0, prompt_logprobs=3)
    got, want = on.generate(prompt, params)[0], off.generate(prompt, params)[0]
    assert on.base.pool.prefix_cache_hit_tokens == hits          # the base took nothing from the cache
    assert len(got.prompt_logprobs) == len(got.prompt_token_ids) and _prompt_lp(got) == _prompt_lp(want)
    assert got.token_ids == want.token_ids


def test_switch_reaches_the_pools_and_the_cli():
    assert cli.build_parser().parse_args(["generate", "--base", "b", "--prompt", "p"]).enable_prefix_caching
    args = cli.build_parser().parse_args(["serve", "--base", "b", "--nudger", "n", "--no-enable-prefix-caching"])
    assert args.enable_prefix_caching is False


def test_metrics_export_hit_tokens_and_rate_per_model():
    pytest.importorskip("prometheus_client")
    from nudge_engine.server.metrics import ServerMetrics
    metrics = ServerMetrics("m")
    snap = EngineSnapshot(prefix_cache={"base": (30, 120), "nudger": (0, 0)})
    metrics.attach(types.SimpleNamespace(snapshot=snap, num_waiting=0, alive=True))
    text = metrics.render()[0].decode()
    assert 'nudge_prefix_cache_hit_tokens_total{model="base",model_name="m"} 30.0' in text
    assert 'nudge_prefix_cache_query_tokens_total{model="base",model_name="m"} 120.0' in text
    assert 'nudge_prefix_cache_hit_rate{model="base",model_name="m"} 0.25' in text
    assert 'nudge_prefix_cache_hit_rate{model="nudger",model_name="m"} 0.0' in text


def test_aborted_request_leaves_its_blocks_cached_and_correct(tiny_pair, check_pools):
    base, nudger = tiny_pair("llama", "llama", "bytelevel", 0.5)
    off, on = _pair_engines(base, nudger, check_pools)
    prompt = SHARED + QUESTIONS[0]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    stream = on.stream(prompt, params)
    next(stream)
    stream.close()                                   # aborts: every block goes back, the full ones cached
    assert not on.has_unfinished() and on.pools_all_free() and on.base.pool.num_cached > 0
    hits = on.base.pool.prefix_cache_hit_tokens
    got, want = on.generate(prompt, params)[0], off.generate(prompt, params)[0]
    assert on.base.pool.prefix_cache_hit_tokens > hits
    assert (got.token_ids, got.sources) == (want.token_ids, want.sources)
