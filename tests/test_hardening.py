"""The engine under hostile input (issue 12): degenerate sampling settings, the last position of the
context, a pool too small, and a failure in one request's own work. Each case runs beside a
well-formed request in the same batch, which must finish exactly as it does alone, and both pools
must be free afterwards."""
from __future__ import annotations

import pytest
import torch

from nudge_engine.pairing import device_drafts
from nudge_engine.engine import NudgeEngine
from nudge_engine.engine.request import RequestFailedError
from nudge_engine.engine.sampling_params import NudgeParams, SamplingParams

PROMPT = "The quick brown fox"
WELL_FORMED = SamplingParams(max_tokens=12, temperature=0)
SHORT_CONTEXT = 80


@pytest.fixture(scope="module")
def pair(tiny_pair):
    return tiny_pair("llama", "llama", "bytelevel", 0.5)


@pytest.fixture(scope="module")
def engine(pair):
    return NudgeEngine(*pair, gamma=0.4, draft_tokens=3, num_blocks=256)


@pytest.fixture(scope="module")
def alone(engine):
    """The well-formed request's output when it runs alone."""
    return engine.generate(PROMPT, WELL_FORMED)[0]


def _beside(engine, alone, params, nudge=None, prompt=PROMPT):
    """Runs `params` in one batch with the well-formed request; checks the latter and the pools."""
    outs = engine.generate([prompt, PROMPT], [params, WELL_FORMED], [nudge, None])
    assert outs[1].token_ids == alone.token_ids and outs[1].sources == alone.sources
    assert not engine.has_unfinished() and engine.pools_all_free()
    return outs[0]


@pytest.mark.parametrize("fields", [
    {"top_p": 1e-300, "temperature": 1.0},
    {"top_p": 5e-324, "temperature": 0.8, "top_k": 3},
    {"top_p": 1e-40, "temperature": 2.0, "min_p": 1.0},
])
def test_top_p_that_keeps_nothing_keeps_the_top_token(engine, alone, fields):
    out = _beside(engine, alone, SamplingParams(max_tokens=8, seed=3, **fields))
    assert out.finish_reason in ("length", "stop") and out.error is None
    # Keeping only the top token is greedy with respect to the processed distribution.
    greedy = engine.generate(PROMPT, SamplingParams(max_tokens=8, temperature=0))[0]
    assert out.token_ids == greedy.token_ids


@pytest.mark.parametrize("temperature", [1e-45, 1e-40, 1e-38, 5e-6])
def test_temperature_below_epsilon_is_greedy(engine, alone, temperature):
    params = SamplingParams(max_tokens=8, temperature=temperature, seed=1)
    assert params.temperature == 0 and params.greedy
    out = _beside(engine, alone, params)
    greedy = engine.generate(PROMPT, SamplingParams(max_tokens=8, temperature=0))[0]
    assert out.token_ids == greedy.token_ids and out.sources == greedy.sources


@pytest.mark.parametrize("nudge", [
    NudgeParams(nudger_top_p=1e-300, nudger_temperature=1.0, gamma=0.9),
    NudgeParams(nudger_temperature=1e-40, gamma=0.9),
    NudgeParams(nudger_top_k=-1, nudger_temperature=1e-39, gamma=0.9),
])
def test_nudger_twins_are_normalized_too(engine, alone, nudge):
    out = _beside(engine, alone, SamplingParams(max_tokens=8, temperature=1.0, seed=5), nudge)
    assert out.finish_reason == "length" and "nudger" in out.sources


def test_top_k_minus_one_means_off():
    assert SamplingParams(top_k=-1).top_k == 0
    assert NudgeParams(nudger_top_k=-1).nudger_sampling(SamplingParams()).top_k == 0
    with pytest.raises(ValueError, match="top_k must be an integer >= 0"):
        SamplingParams(top_k=-2)
    with pytest.raises(ValueError, match="nudger_top_p must be in"):
        NudgeParams(nudger_top_p=0.0)
    with pytest.raises(ValueError, match="nudger_temperature must be a finite number"):
        NudgeParams(nudger_temperature=float("nan"))


def test_processed_probs_are_always_finite():
    from nudge_engine.engine.sampler import processed_probs
    logits = torch.randn(5, 40)
    logits[3, 7] = float("nan")
    params = [SamplingParams(top_p=1e-300), SamplingParams(temperature=1e-5), SamplingParams(min_p=1.0),
              SamplingParams(temperature=3e38), SamplingParams(top_k=1, top_p=5e-324)]
    probs = processed_probs(logits, params)
    assert torch.isfinite(probs).all() and (probs >= 0).all()
    assert torch.allclose(probs.sum(-1), torch.ones(5))
    assert probs[0].argmax() == logits[0].argmax() and probs[0].max() == 1


@pytest.fixture(scope="module")
def short_pair(tiny_pair):
    return tiny_pair("llama", "llama", "bytelevel", 0.5, max_position_embeddings=SHORT_CONTEXT)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("draft_tokens", [1, 8])
def test_drafts_stop_at_the_last_position_of_the_context(short_pair, temperature, draft_tokens):
    """prompt + max_tokens = the whole context, drafting on: no draft may reach past the last position."""
    engine = NudgeEngine(*short_pair, gamma=0.6, draft_tokens=draft_tokens, adaptive_drafting=False, num_blocks=64)
    context = engine.base.config.max_position_embeddings
    prompt = engine.base.tokenizer.encode("Hi")
    params = SamplingParams(max_tokens=context - len(prompt), temperature=temperature, seed=2, ignore_eos=True)
    out = engine.generate([prompt, PROMPT], [params, WELL_FORMED])
    assert out[0].finish_reason == "length" and len(out[0].token_ids) == context - len(prompt)
    assert out[0].drafted_tokens > 0
    assert not engine.has_unfinished() and engine.pools_all_free()


def test_cross_tokenizer_pair_reaches_the_last_position(tiny_model):
    base = tiny_model("llama", "bytelevel", max_position_embeddings=SHORT_CONTEXT)
    nudger = tiny_model("llama3", "metaspace", max_position_embeddings=SHORT_CONTEXT)
    engine = NudgeEngine(base, nudger, gamma=0.6, draft_tokens=4, num_blocks=64)
    assert engine.pairing == "cross-tokenizer"
    prompt = {"base": engine.base.tokenizer.encode("Hi"), "nudger": engine.nudger.tokenizer.encode("Hi")}
    params = SamplingParams(max_tokens=SHORT_CONTEXT - len(prompt["nudger"]) - 1, temperature=0, ignore_eos=True)
    out = engine.generate(prompt, params)[0]
    assert out.finish_reason == "length" and out.error is None
    assert not engine.has_unfinished() and engine.pools_all_free()


def test_request_larger_than_a_pool_is_refused_at_admission(pair):
    engine = NudgeEngine(*pair, gamma=0.4, num_blocks=4, block_size=16)   # 64 tokens per pool
    with pytest.raises(ValueError, match=r"needs 5 KV blocks of 16 tokens, more than the base model's whole pool \(4"):
        engine.add_request("Hi", SamplingParams(max_tokens=70))
    assert not engine.has_unfinished() and engine.pools_all_free()
    out = engine.generate(PROMPT, WELL_FORMED)[0]       # the engine is unharmed
    assert out.finish_reason == "length"
    assert engine.pools_all_free()


def test_a_failure_in_one_requests_work_ends_that_request_alone(engine, alone, monkeypatch):
    """A request whose own sampling raises ends with finish_reason "error"; the batch goes on."""
    poisoned = 424242
    real_draw = device_drafts._sample    # the nudger's draft draw (it stays on the device)

    def draw(probs, generator):
        if generator.initial_seed() == poisoned:
            raise RuntimeError("planted failure")
        return real_draw(probs, generator)

    monkeypatch.setattr(device_drafts, "_sample", draw)
    bad = SamplingParams(max_tokens=8, temperature=1.0, seed=poisoned)
    out = _beside(engine, alone, bad, NudgeParams(gamma=1.5))        # the nudger samples its first token
    assert out.finish_reason == "error" and "planted failure" in out.error
    assert engine.stats.failed_requests >= 1
    with pytest.raises(RequestFailedError, match="planted failure"):
        list(engine.stream(PROMPT, bad, NudgeParams(gamma=1.5)))
    assert engine.pools_all_free()
