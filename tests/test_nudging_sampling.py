"""Sampling: the engine's output distribution equals sequential nudging with sampling.

The exact joint distribution of the first two tokens under NUDGING.md section 2 (with sampling)
is computed from transformers' probabilities; the engine's empirical distribution over many
seeds must pass a chi-square test at significance 0.001 (fixed seeds: the test is deterministic).
"""
from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from nudge_engine.engine import NudgeEngine
from nudge_engine.sampling_params import NudgeParams, SamplingParams

from reference import hf_model

NUM_SAMPLES = 3000
SIGNIFICANCE = 1e-3
GAMMA = 0.5
NUDGER_TEMPERATURE = 0.7
MIN_EXPECTED = 5.0


@torch.no_grad()
def _probs(model, prompts: list[list[int]], temperature: float = 1.0) -> torch.Tensor:
    logits = model(torch.tensor(prompts)).logits[:, -1].double()
    return torch.softmax(logits / temperature, -1)


def exact_two_token_distribution(base_folder, nudger_folder, prompt, word_start, roa=True) -> torch.Tensor:
    """P[t1, t2] for sequential nudging: raw base distribution for the handoff test, the nudger at its own temperature."""
    base, nudger = hf_model(base_folder), hf_model(nudger_folder)
    p0, q0 = _probs(base, [prompt])[0], _probs(nudger, [prompt], NUDGER_TEMPERATURE)[0]
    nudging_first = float(p0.max()) < GAMMA
    first = q0 if nudging_first else p0
    vocab = p0.shape[0]
    batch = [prompt + [t] for t in range(vocab)]
    p1, q1 = _probs(base, batch), _probs(nudger, batch, NUDGER_TEMPERATURE)  # [vocab(t1), vocab(t2)]
    top1, argmax = p1.max(-1).values, p1.argmax(-1)
    ws = torch.tensor(word_start[:vocab])
    if nudging_first:  # mode NUDGE, run 1: the nudger proposes t; at a word start the base may take over
        resume = (top1 >= GAMMA)[:, None] | (roa & (argmax[:, None] == torch.arange(vocab)[None, :]))
        hand_back = ws[None, :] & resume                                   # [t1, t]
        second = p1 * (q1 * hand_back).sum(-1, keepdim=True) + q1 * (~hand_back)
    else:              # mode BASE: the nudger writes t2 iff the base is unsure
        second = torch.where((top1 < GAMMA)[:, None], q1, p1)
    return first[:, None] * second


def chi_square_pvalue(counts: dict[tuple[int, int], int], exact: torch.Tensor, n: int) -> float:
    expected = exact.flatten() * n
    observed = torch.zeros_like(expected)
    vocab = exact.shape[1]
    for (a, b), c in counts.items():
        observed[a * vocab + b] += c
    big = expected >= MIN_EXPECTED
    obs = torch.cat([observed[big], observed[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    return float(chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue)


@pytest.fixture(scope="module")
def sampling_pair(tiny_pair):
    base, nudger = tiny_pair("llama", "llama", "bytelevel", agreement=0.6)
    return base, nudger, NudgeEngine(base, nudger, max_num_seqs=256)


@pytest.mark.parametrize("draft_tokens", [0, 3])
@pytest.mark.parametrize("prompt_kind", ["base-sure", "base-unsure"])
def test_two_token_distribution_matches_sequential(draft_tokens, prompt_kind, sampling_pair, check_pools):
    base, nudger, engine = sampling_pair
    check_pools(engine)
    prompt = _pick_prompt(base, engine, unsure=prompt_kind == "base-unsure")
    exact = exact_two_token_distribution(base, nudger, prompt, engine.word_start.tolist())
    params = [SamplingParams(max_tokens=2, temperature=1.0, seed=s, ignore_eos=True) for s in range(NUM_SAMPLES)]
    nudge = NudgeParams(gamma=GAMMA, draft_tokens=draft_tokens, nudger_temperature=NUDGER_TEMPERATURE)
    outs = engine.generate([prompt] * NUM_SAMPLES, params, nudge)
    counts: dict[tuple[int, int], int] = {}
    for o in outs:
        key = tuple(o.token_ids)
        counts[key] = counts.get(key, 0) + 1
    assert chi_square_pvalue(counts, exact, NUM_SAMPLES) > SIGNIFICANCE
    assert any("nudger" in o.sources for o in outs) and any("base" in o.sources for o in outs)


def test_chi_square_detects_a_wrong_distribution(sampling_pair):
    """The test above can fail: the same sampler judged against base-alone sampling is rejected."""
    base, nudger, engine = sampling_pair
    prompt = _pick_prompt(base, engine, unsure=True)
    exact = exact_two_token_distribution(base, nudger, prompt, engine.word_start.tolist())
    params = [SamplingParams(max_tokens=2, temperature=1.0, seed=s, ignore_eos=True) for s in range(NUM_SAMPLES)]
    outs = engine.generate([prompt] * NUM_SAMPLES, params, NudgeParams(gamma=0.0))  # never nudges
    counts: dict[tuple[int, int], int] = {}
    for o in outs:
        counts[tuple(o.token_ids)] = counts.get(tuple(o.token_ids), 0) + 1
    assert chi_square_pvalue(counts, exact, NUM_SAMPLES) < SIGNIFICANCE


def test_same_seed_same_nudged_output(sampling_pair, check_pools):
    base, nudger, engine = sampling_pair
    check_pools(engine)
    params = SamplingParams(max_tokens=16, temperature=0.9, seed=42, ignore_eos=True)
    nudge = NudgeParams(gamma=GAMMA, draft_tokens=3)
    alone = engine.generate([[20, 30, 40]], params, nudge)[0]
    mixed = engine.generate([[5, 6], [20, 30, 40], [7]],
                            [SamplingParams(max_tokens=16, temperature=1.0, seed=1), params,
                             SamplingParams(max_tokens=16, temperature=0.0)], nudge)
    assert mixed[1].token_ids == alone.token_ids and mixed[1].sources == alone.sources


def _pick_prompt(base_folder, engine, unsure: bool) -> list[int]:
    """A prompt whose base top-1 lies clearly on one side of gamma."""
    model = hf_model(base_folder)
    for start in range(8, 400, 7):
        prompt = [start, start + 1, start + 3]
        top1 = float(_probs(model, [prompt])[0].max())
        if (unsure and top1 < GAMMA - 0.1) or (not unsure and top1 > GAMMA + 0.1):
            return prompt
    raise AssertionError("no suitable prompt")
