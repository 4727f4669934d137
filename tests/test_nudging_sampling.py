"""Sampling: the engine's output distribution equals sequential nudging with sampling.

The exact joint distribution of the first two tokens under NUDGING.md section 2 (with sampling,
each model with its own temperature / top-p / top-k) is computed here from transformers' logits
and this file's own processed distributions; the engine's empirical distribution over many seeds
must pass a chi-square test at significance 1e-3. Seeds are fixed, so the test is deterministic.

The cases are chosen so that the path under test really runs: drafts are fixed-length
(adaptive_drafting=False), and where BASE-mode drafting is the subject the first draft is accepted
between 20 % and 80 % of the time (measured from the engine's own decisions), so rejection sampling
and the residual draw both happen thousands of times. Controls: the same test rejects the walk
with the acceptance ratio inverted, a walk that never rejects, and base-alone sampling.
"""
from __future__ import annotations

import inspect
import math
import sys
import types
from dataclasses import dataclass

import pytest
import torch
from scipy.stats import chisquare

import nudge_engine.pairing.handoff
import nudge_engine.pairing.sampling_walk
from nudge_engine.engine import NudgeEngine
from nudge_engine.engine.request import Mode, Source
from nudge_engine.engine.sampling_params import NudgeParams, SamplingParams
from nudge_engine.pairing.sampling_walk import sampling_walk

from reference import hf_model, processed, word_start_table

NUM_SAMPLES = 10000
CONTROL_SAMPLES = 3000
SIGNIFICANCE = 1e-3
CONTROL_SIGNIFICANCE = 1e-6    # a control must fail by far, not by luck
GAMMA = 0.5
MIN_EXPECTED = 5.0
AGREEMENT = 0.8                # tiny-pair knob: base and nudger overlap about half their mass


@dataclass(frozen=True)
class Case:
    draft_tokens: int
    prompt_kind: str                       # "base-sure": BASE at the first position; "base-unsure": NUDGE
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    nudger_temperature: float = 0.7
    nudger_top_p: float = 1.0
    nudger_top_k: int = 0

    def params(self, seed: int) -> SamplingParams:
        return SamplingParams(max_tokens=2, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              seed=seed, ignore_eos=True)

    def nudge(self) -> NudgeParams:
        return NudgeParams(gamma=GAMMA, draft_tokens=self.draft_tokens, adaptive_drafting=False,
                           nudger_temperature=self.nudger_temperature, nudger_top_p=self.nudger_top_p,
                           nudger_top_k=self.nudger_top_k)


CASES = {
    "k1-base-sure": Case(1, "base-sure"),
    "k3-base-sure": Case(3, "base-sure"),
    "k3-base-sure-topp-topk": Case(3, "base-sure", temperature=0.8, top_p=0.9, top_k=40,
                                   nudger_temperature=1.2, nudger_top_p=0.95, nudger_top_k=30),
    "k1-base-unsure-topk": Case(1, "base-unsure", top_k=50, nudger_top_p=0.9),
    "k3-base-unsure": Case(3, "base-unsure", temperature=0.9, nudger_temperature=1.0),
    "k0-base-unsure": Case(0, "base-unsure"),
}


@torch.no_grad()
def _logits(model, prompts: list[list[int]]) -> torch.Tensor:
    return model(torch.tensor(prompts)).logits[:, -1].double()


def exact_two_token_distribution(base_folder, nudger_folder, prompt, case: Case, word_start, roa=True):
    """P[t1, t2] of sequential nudging: the raw base distribution decides the handoffs, each model
    samples from its own processed distribution."""
    base, nudger = hf_model(base_folder), hf_model(nudger_folder)
    lb0, ln0 = _logits(base, [prompt])[0], _logits(nudger, [prompt])[0]
    vocab = lb0.shape[0]
    batch = [prompt + [t] for t in range(vocab)]
    lb1, ln1 = _logits(base, batch), _logits(nudger, batch)               # [vocab(t1), vocab]

    def p(lg):
        return processed(lg, case.temperature, case.top_p, case.top_k)

    def q(lg):
        return processed(lg, case.nudger_temperature, case.nudger_top_p, case.nudger_top_k)

    raw1 = torch.softmax(lb1, -1)
    top1, argmax = raw1.max(-1).values, raw1.argmax(-1)                   # [t1]
    nudging_first = float(torch.softmax(lb0, -1).max()) < GAMMA
    first = q(ln0) if nudging_first else p(lb0)
    p1, q1 = p(lb1), q(ln1)
    ws = torch.tensor(word_start[:vocab])
    if nudging_first:  # NUDGE, run 1: the nudger proposes t; at a word start the base may take over
        resume = (top1 >= GAMMA)[:, None] | (roa & (argmax[:, None] == torch.arange(vocab)[None, :]))
        hand_back = ws[None, :] & resume                                  # [t1, t]
        second = p1 * (q1 * hand_back).sum(-1, keepdim=True) + q1 * (~hand_back)
    else:              # BASE: the nudger writes t2 iff the base is unsure
        second = torch.where((top1 < GAMMA)[:, None], q1, p1)
    return first[:, None] * second


def chi_square_pvalue(outs, exact: torch.Tensor) -> float:
    n, vocab = len(outs), exact.shape[1]
    observed = torch.zeros(exact.numel(), dtype=torch.float64)
    for o in outs:
        observed[o.token_ids[0] * vocab + o.token_ids[1]] += 1
    expected = exact.flatten() * n
    assert float(observed[expected == 0].sum()) == 0, "the engine emitted a pair of probability 0"
    big = expected >= MIN_EXPECTED
    obs, exp = observed[big], expected[big]
    if float(expected[~big].sum()) > 0:      # the rare pairs pooled into one cell
        obs = torch.cat([obs, observed[~big].sum()[None]])
        exp = torch.cat([exp, expected[~big].sum()[None]])
    return float(chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue)


@pytest.fixture(scope="module")
def sampling_pair(tiny_pair):
    base, nudger = tiny_pair("llama", "llama", "bytelevel", agreement=AGREEMENT)
    return base, nudger, NudgeEngine(base, nudger, max_num_seqs=256)


def pick_prompt(base_folder, nudger_folder, case: Case) -> list[int]:
    """A prompt whose raw base top-1 lies clearly on the case's side of gamma; for base-sure cases,
    one where the first draft is accepted with probability sum(min(p', q)) between 0.3 and 0.7."""
    base, nudger = hf_model(base_folder), hf_model(nudger_folder)
    for start in range(8, 400, 7):
        prompt = [start, start + 1, start + 3]
        lb, ln = _logits(base, [prompt])[0], _logits(nudger, [prompt])[0]
        top1 = float(torch.softmax(lb, -1).max())
        if case.prompt_kind == "base-unsure":
            if top1 < GAMMA - 0.1:
                return prompt
            continue
        accept = float(torch.minimum(processed(lb, case.temperature, case.top_p, case.top_k),
                                     processed(ln, case.nudger_temperature, case.nudger_top_p,
                                               case.nudger_top_k)).sum())
        if top1 > GAMMA + 0.1 and 0.3 <= accept <= 0.7:
            return prompt
    raise AssertionError("no suitable prompt")


def run_case(sampling_pair, case: Case, draft_tally, num_samples=NUM_SAMPLES):
    base, nudger, engine = sampling_pair
    prompt = pick_prompt(base, nudger, case)
    tally = draft_tally(engine)
    outs = engine.generate([prompt] * num_samples, [case.params(s) for s in range(num_samples)], case.nudge())
    exact = exact_two_token_distribution(base, nudger, prompt, case, word_start_table(nudger))
    return outs, exact, tally


@pytest.mark.parametrize("name", list(CASES))
def test_two_token_distribution_matches_sequential(name, sampling_pair, check_pools, draft_tally):
    case = CASES[name]
    check_pools(sampling_pair[2])
    outs, exact, tally = run_case(sampling_pair, case, draft_tally)
    pvalue = chi_square_pvalue(outs, exact)
    print(f"{name}: p = {pvalue:.3g}, first-draft acceptance {tally.acceptance:.2f}, {vars(tally)}")
    assert pvalue > SIGNIFICANCE
    sources = [s for o in outs for s in o.sources]
    assert sources.count("nudger") >= 500 and sources.count("base") >= 500
    if case.draft_tokens > 0 and case.prompt_kind == "base-sure":
        # Rejection sampling really ran, both ways, at the first position of every request.
        assert tally.accepted + tally.rejected >= 0.9 * NUM_SAMPLES
        assert 0.2 <= tally.acceptance <= 0.8, tally.acceptance
        assert tally.accepted_total >= 0.2 * NUM_SAMPLES, vars(tally)
    if case.draft_tokens > 0 and case.prompt_kind == "base-unsure":
        # The switch to nudging takes the first draft as the nudger's; the handback samples afresh.
        assert tally.nudged >= 0.9 * NUM_SAMPLES, vars(tally)
    if case.prompt_kind == "base-unsure":
        assert sum(o.sources == ["nudger", "base"] for o in outs) >= 0.05 * NUM_SAMPLES
    if case.draft_tokens == 0:
        assert tally.drafted == 0


def mutated_walk(old: str, new: str, monkeypatch):
    """The engine's own sampling walk with one planted bug (its source, edited and re-run)."""
    source = inspect.getsource(nudge_engine.pairing.sampling_walk)
    assert source.count(old) == 1, old
    module = types.ModuleType("nudge_engine.pairing._mutated_walk")
    module.__package__ = "nudge_engine.pairing"
    monkeypatch.setitem(sys.modules, module.__name__, module)      # dataclasses look their module up
    exec(compile(source.replace(old, new), "<mutated sampling_walk>", "exec"), module.__dict__)
    return module.sampling_walk


@pytest.mark.parametrize("name,old,new", [
    ("k1-base-sure", "min(1.0, p / q)", "min(1.0, q / p)"),                 # the ratio inverted
    ("k3-base-sure", "uniform(generator) < min(1.0, p / q)", "True"),      # never reject
    ("k1-base-unsure-topk", "if fresh == d:", "if True:"),                 # keep the draft at a handback
])
def test_the_distribution_test_rejects_a_wrong_walk(name, old, new, sampling_pair, draft_tally, monkeypatch):
    """The test above can fail: the same test, with a bug planted in the walk, is rejected by far."""
    monkeypatch.setattr(nudge_engine.pairing.handoff, "sampling_walk", mutated_walk(old, new, monkeypatch))
    outs, exact, _ = run_case(sampling_pair, CASES[name], draft_tally, CONTROL_SAMPLES)
    pvalue = chi_square_pvalue(outs, exact)
    print(f"control {name} {new}: p = {pvalue:.3g}")
    assert pvalue < CONTROL_SIGNIFICANCE


def test_the_distribution_test_rejects_base_alone_sampling(sampling_pair, draft_tally):
    base, nudger, engine = sampling_pair
    case = CASES["k0-base-unsure"]
    prompt = pick_prompt(base, nudger, case)
    exact = exact_two_token_distribution(base, nudger, prompt, case, word_start_table(nudger))
    outs = engine.generate([prompt] * CONTROL_SAMPLES, [case.params(s) for s in range(CONTROL_SAMPLES)],
                           NudgeParams(gamma=0.0))  # never nudges
    assert chi_square_pvalue(outs, exact) < CONTROL_SIGNIFICANCE


# ---------------------------------------------------------------- top-1 exactly gamma
def _one_hot(vocab, *tokens) -> torch.Tensor:
    out = torch.zeros(len(tokens), vocab)
    out[torch.arange(len(tokens)), torch.tensor(tokens)] = 1.0
    return out


def test_sampling_walk_top1_exactly_gamma_keeps_or_gives_back_to_the_base():
    vocab, gamma = 6, 0.4375                                     # exactly representable
    ws = torch.tensor([False, True, True, False, False, False])
    gen = torch.Generator().manual_seed(0)
    # BASE with top1 == gamma: no nudge; the draft (p' == q, one-hot) is accepted as the base's.
    w = sampling_walk([3], torch.tensor([gamma, 0.9]), torch.tensor([3, 4]), _one_hot(vocab, 3, 4),
                      _one_hot(vocab, 3), Mode.BASE, 0, gamma, False, ws, gen)
    assert (w.num_accepted, w.emit_token, w.accepted_sources, w.mode) == (1, 4, [Source.BASE], Mode.BASE)
    # One ulp below gamma: the nudger's draft is taken.
    below = math.nextafter(gamma, 0.0)
    w = sampling_walk([3], torch.tensor([below, 0.9], dtype=torch.float64), torch.tensor([3, 4]),
                      _one_hot(vocab, 3, 4), _one_hot(vocab, 3), Mode.BASE, 0, gamma, False, ws, gen)
    assert w.accepted_sources == [Source.NUDGER]
    # NUDGE, run 1, a word start, top1 == gamma (no agreement rule): the base takes over there.
    w = sampling_walk([1], torch.tensor([gamma, 0.9]), torch.tensor([5, 4]), _one_hot(vocab, 1, 4),
                      _one_hot(vocab, 1), Mode.NUDGE, 1, gamma, False, ws, gen)
    assert (w.mode, w.accepted_sources) == (Mode.BASE, [Source.BASE])


def test_engine_sampling_top1_exactly_gamma_stays_with_the_base(sampling_pair, check_pools, monkeypatch):
    """gamma set to exactly the top-1 the engine computes: the base writes; one ulp above, the nudger."""
    base, nudger, engine = sampling_pair
    check_pools(engine)
    seen = []
    stats = nudge_engine.pairing.handoff.top1_stats_torch

    def spy(logits, *a):
        out = stats(logits, *a)
        seen.append(float(torch.exp(out[0][0] - out[2][0])))    # the walk's top-1 at the first row
        return out

    monkeypatch.setattr(nudge_engine.pairing.handoff, "top1_stats_torch", spy)
    prompt = pick_prompt(base, nudger, CASES["k1-base-sure"])
    params = SamplingParams(max_tokens=1, temperature=1.0, seed=5, ignore_eos=True)

    def first_source(gamma):
        return engine.generate(prompt, params, NudgeParams(gamma=gamma, draft_tokens=2,
                                                           adaptive_drafting=False))[0].sources[0]

    first_source(0.0)
    top1 = seen[0]
    assert first_source(top1) == "base" and seen[-1] == top1
    assert first_source(math.nextafter(top1, 1.0)) == "nudger"


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
