"""Sampling and logprobs on the cross-tokenizer text path (NUDGING.md section 7, last paragraph;
text_sampling.py, text_logprobs.py).

The engine's distribution of output texts over a short horizon (a few base tokens: nudging, handing
back, drafts verified by exact match) must equal the slow sequential reference's
(tests/reference_cross.py with sampling: full forwards, contexts rebuilt by the section 7 rule),
by a two-sample chi-square test at significance 1e-3. Seeds are fixed, so the test is
deterministic. Control: the same test rejects an engine with a planted bug (the base keeps its raw
argmax at a handback instead of a fresh sample). Floors prove that nudging, handbacks and draft
acceptance really happened in the samples tested.
"""
from __future__ import annotations

import dataclasses
import inspect
import sys
import types
from collections import Counter
from dataclasses import dataclass

import pytest
import torch
from scipy.stats import chi2_contingency

import nudge_engine.pairing.text
from nudge_engine.engine import NudgeEngine
from nudge_engine.engine.sampling_params import NudgeParams, SamplingParams

from reference import eos_ids, hf_model, next_logits
from reference_cross import Sampling, TokenizerBytes, cross_nudging
from test_cross_tokenizer import twin_with_another_tokenizer

NUM_SAMPLES = 2000
SIGNIFICANCE = 1e-3
CONTROL_SIGNIFICANCE = 1e-6     # a control must fail by far, not by luck
MIN_EXPECTED = 5.0
PROMPT = "The quick brown fox"


@dataclass(frozen=True)
class Case:
    pair: str                    # "cross": unrelated tiny models; "twin": one model, two tokenizers
    gamma: float
    draft_tokens: int
    max_tokens: int = 4
    base: tuple = (0.7, 1.0, 8)  # temperature, top_p, top_k
    nudger: tuple = (0.9, 1.0, 8)

    def params(self, seed: int) -> SamplingParams:
        t, p, k = self.base
        return SamplingParams(max_tokens=self.max_tokens, temperature=t, top_p=p, top_k=k, seed=seed)

    def nudge(self, **kw) -> NudgeParams:
        t, p, k = self.nudger
        return NudgeParams(**{"gamma": self.gamma, "draft_tokens": self.draft_tokens, "adaptive_drafting": False,
                              "nudger_temperature": t, "nudger_top_p": p, "nudger_top_k": k, **kw})


CASES = {
    # Nudge runs that end in handbacks to the base, drafts of a nudger that rarely agrees.
    "cross-nudge-handback": Case("cross", gamma=0.3, draft_tokens=2, base=(1.3, 1.0, 8)),
    # An agreeing drafter: BASE-mode speculation by exact match passes often; top-p on the base.
    "twin-speculation": Case("twin", gamma=0.25, draft_tokens=4, base=(1.0, 0.9, 0), nudger=(0.6, 1.0, 0)),
}


@pytest.fixture(scope="module")
def pairs(tiny_model, tmp_path_factory):
    base, nudger = tiny_model("llama", "bytelevel"), tiny_model("llama3", "metaspace")
    twin = twin_with_another_tokenizer(base, tmp_path_factory.mktemp("twin") / "twin")
    return {"cross": (base, nudger, NudgeEngine(base, nudger, max_num_seqs=256)),
            "twin": (base, twin, NudgeEngine(base, twin, max_num_seqs=256))}


_REFERENCE_TEXTS: dict[str, Counter] = {}


def reference_texts(pairs, name: str) -> Counter:
    """The sequential reference's output texts over NUM_SAMPLES draws (computed once per case)."""
    if name not in _REFERENCE_TEXTS:
        case = CASES[name]
        base, nudger, engine = pairs[case.pair]
        ids = (engine.base.tokenizer.encode(PROMPT), engine.nudger.tokenizer.encode(PROMPT))
        wps = (TokenizerBytes(base), TokenizerBytes(nudger))
        gen, cache = torch.Generator().manual_seed(12345), {}
        texts = Counter()
        for _ in range(NUM_SAMPLES):
            r = cross_nudging((base, nudger), wps, ids, case.gamma, True, case.max_tokens,
                              (eos_ids(base), eos_ids(nudger)), engine.nudger_context_limit,
                              Sampling(case.base, case.nudger, gen, cache))
            texts[r.text] += 1
        _REFERENCE_TEXTS[name] = texts
    return _REFERENCE_TEXTS[name]


def two_sample_pvalue(a: Counter, b: Counter) -> float:
    """Chi-square test of homogeneity; texts expected fewer than MIN_EXPECTED times pooled in one cell."""
    keys = sorted(set(a) | set(b))
    table = torch.tensor([[a[k] for k in keys], [b[k] for k in keys]], dtype=torch.float64)
    rare = table.sum(0) * table.sum(1).min() / table.sum() < MIN_EXPECTED
    table = torch.cat([table[:, ~rare], table[:, rare].sum(1, keepdim=True)], 1)
    return float(chi2_contingency(table.numpy())[1])


def run_engine(pairs, name: str, **nudge):
    case = CASES[name]
    engine = pairs[case.pair][2]
    return engine.generate([PROMPT] * NUM_SAMPLES, [case.params(s) for s in range(NUM_SAMPLES)], case.nudge(**nudge))


@pytest.mark.parametrize("name", list(CASES))
def test_text_distribution_matches_the_sequential_reference(name, pairs, check_pools):
    engine = pairs[CASES[name].pair][2]
    check_pools(engine)
    outs = run_engine(pairs, name)
    pvalue = two_sample_pvalue(Counter(o.text for o in outs), reference_texts(pairs, name))
    writers = [tuple(w for _, w in o.spans) for o in outs]
    handbacks = sum(any(p == ("nudger", "base") for p in zip(w, w[1:])) for w in writers)
    nudged = sum("nudger" in w for w in writers)
    accepted = sum(o.accepted_tokens for o in outs)
    print(f"{name}: p = {pvalue:.3g}, nudged {nudged}, handbacks {handbacks}, accepted drafts {accepted}")
    assert pvalue > SIGNIFICANCE
    assert nudged >= 0.2 * NUM_SAMPLES and nudged <= 0.95 * NUM_SAMPLES
    if CASES[name].pair == "cross":
        assert handbacks >= 0.05 * NUM_SAMPLES
    else:   # BASE-mode speculation across tokenizers really passed drafts
        assert accepted >= 0.5 * NUM_SAMPLES


def mutated_pairing(old: str, new: str, monkeypatch):
    """text.py's TextPairing with one planted bug (its source, edited and re-run)."""
    source = inspect.getsource(nudge_engine.pairing.text)
    assert source.count(old) == 1, old
    module = types.ModuleType("nudge_engine.pairing._mutated_text")
    module.__package__ = "nudge_engine.pairing"
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(source.replace(old, new), "<mutated text.py>", "exec"), module.__dict__)
    return module.TextPairing


def test_the_distribution_test_rejects_a_handback_without_a_fresh_sample(pairs, monkeypatch):
    """The test above can fail: the base taking its raw argmax at a handback is rejected by far."""
    name = "cross-nudge-handback"
    engine = pairs["cross"][2]
    bad = mutated_pairing("resumed, resumed_row = base_token(req, row, a), row", "resumed, resumed_row = a, row",
                          monkeypatch)
    monkeypatch.setattr(engine._pair, "_walk_nudge", types.MethodType(bad._walk_nudge, engine._pair))
    outs = run_engine(pairs, name)
    pvalue = two_sample_pvalue(Counter(o.text for o in outs), reference_texts(pairs, name))
    print(f"control: p = {pvalue:.3g}")
    assert pvalue < CONTROL_SIGNIFICANCE


def test_a_seed_fixes_the_text_whatever_the_batch_and_the_drafting(pairs, check_pools):
    case = dataclasses.replace(CASES["cross-nudge-handback"], max_tokens=16)   # several nudge runs each
    engine = pairs["cross"][2]
    check_pools(engine)
    seeds = list(range(40))
    alone = {s: engine.generate(PROMPT, case.params(s), case.nudge(draft_tokens=0))[0] for s in seeds}
    others = ["x", "Once upon a time", "日本 and the sea\n"]
    for k, adaptive in ((1, False), (5, False), (5, True)):
        prompts = [PROMPT] * len(seeds) + others
        params = [case.params(s) for s in seeds] + [SamplingParams(max_tokens=6, temperature=1.0)] * len(others)
        outs = engine.generate(prompts, params, case.nudge(draft_tokens=k, adaptive_drafting=adaptive))
        for s, out in zip(seeds, outs):
            assert (out.text, out.spans) == (alone[s].text, alone[s].spans), (s, k, adaptive)
    # The texts really differ by seed and the seeds cover both handoff directions.
    assert len({o.text for o in alone.values()}) >= 10
    writers = {tuple(w for _, w in o.spans) for o in alone.values()}
    assert any("nudger" in w[1:] and "base" in w[w.index("nudger"):] for w in writers), writers


# Each SamplingParams field on the text path: what shows that it works, or that it is refused.
WORKS = {"max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids", "ignore_eos",
         "include_stop_str_in_output", "logprobs", "prompt_logprobs"}      # logprobs: tests below
REFUSED: set[str] = set()


def test_every_sampling_params_field_works_or_is_refused(pairs, check_pools):
    # A field added to SamplingParams fails here until the text path handles or refuses it.
    assert {f.name for f in dataclasses.fields(SamplingParams)} == WORKS | REFUSED
    engine = pairs["cross"][2]
    check_pools(engine)
    nudge = NudgeParams(gamma=0.3, draft_tokens=2)
    greedy = engine.generate(PROMPT, SamplingParams(max_tokens=8, temperature=0), nudge)[0]
    # Filters that keep only the top token make sampling greedy (so each filter is applied), for both models.
    for kw in ({"top_k": 1}, {"top_p": 1e-6}, {"min_p": 1.0}):
        both = NudgeParams(gamma=0.3, draft_tokens=2, **{"nudger_" + k: v for k, v in kw.items()})
        out = engine.generate(PROMPT, SamplingParams(max_tokens=8, temperature=1.5, seed=3, **kw), both)[0]
        assert (out.text, out.spans) == (greedy.text, greedy.spans), kw
    seeds = [engine.generate(PROMPT, SamplingParams(max_tokens=8, temperature=1.5, seed=s), nudge)[0] for s in range(6)]
    assert len({o.text for o in seeds}) >= 3 and len(greedy.token_ids) <= 8
    sampled = seeds[0]
    word = sampled.text[len(sampled.text) // 2:][:2]
    for include in (False, True):
        out = engine.generate(PROMPT, SamplingParams(max_tokens=8, temperature=1.5, seed=0, stop=[word],
                                                     include_stop_str_in_output=include), nudge)[0]
        cut = sampled.text.index(word) + len(word) * include
        assert (out.text, out.finish_reason, out.stop_reason) == (sampled.text[:cut], "stop", word)
    base_written = [t for t, s in zip(greedy.token_ids, greedy.sources) if s == "base"]
    out = engine.generate(PROMPT, SamplingParams(max_tokens=8, temperature=0, stop_token_ids=[base_written[-1]]),
                          nudge)[0]
    assert (out.finish_reason, out.stop_reason) == ("stop", base_written[-1]) and out.token_ids[-1] == base_written[-1]
    out = engine.generate(PROMPT, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), nudge)[0]
    assert out.text.startswith(greedy.text) and out.finish_reason == "length"
    for name in REFUSED:
        with pytest.raises(ValueError, match=f"{name} is not available on the cross-tokenizer"):
            engine.add_request(PROMPT, SamplingParams(**{name: 1}), nudge)
    assert not engine.has_unfinished()


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_logprobs_are_the_writers_on_its_own_context(pairs, check_pools, sampled):
    """One entry per written token, base's and nudger's alike, equal to an independent log-softmax of
    a full transformers forward over the writer's context, rebuilt from the output by the section 7
    rule (own spans as written tokens, the other's converted word by word)."""
    base, nudger, engine = pairs["cross"]
    check_pools(engine)
    folders, wps = (base, nudger), (TokenizerBytes(base), TokenizerBytes(nudger))
    prompts = ["The quick brown fox", "Once upon a time, é"]
    params = [SamplingParams(max_tokens=10, temperature=1.0 if sampled else 0.0, top_k=20, seed=s, logprobs=3,
                             stop=["zz"] if s else []) for s in range(len(prompts))]
    outs = engine.generate(prompts, params, NudgeParams(gamma=0.3, draft_tokens=2))
    written_by = Counter()
    for prompt, out in zip(prompts, outs):
        ctx0 = (engine.base.tokenizer.encode(prompt), engine.nudger.tokenizer.encode(prompt))
        assert len(out.logprobs) == len(out.logprob_token_ids) >= len(out.spans)
        spans: list[list] = []                                  # [writer, bytes, own tokens]
        for jid, entry in zip(out.logprob_token_ids, out.logprobs):
            m, t = engine.logprob_vocab.split(jid)
            written_by[m] += 1
            ctx = list(ctx0[m])
            for w, data, own in spans:
                ctx += own if w == m else wps[m].encode(bytes(data))
            lp = torch.log_softmax(next_logits(hf_model(folders[m]), ctx), -1)
            assert list(entry)[0] == jid and entry[jid] == pytest.approx(float(lp[t]), abs=1e-4)
            offset = jid - t
            top = lp.topk(3)
            for v, i in zip(top.values.tolist(), top.indices.tolist()):
                assert entry[i + offset] == pytest.approx(v, abs=1e-4)
            assert len(entry) <= 4
            if not spans or spans[-1][0] != m:
                spans.append([m, bytearray(), []])
            spans[-1][1] += wps[m].token_bytes[t]
            spans[-1][2].append(t)
        # The entries' tokens are the text, in order (a last token may reach past a length cut).
        joined = b"".join(bytes(d) for _, d, _ in spans)
        assert joined.startswith(out.text.encode()) or joined.decode("utf-8", "replace").startswith(out.text)
    assert written_by[0] >= 3 and written_by[1] >= 3, written_by


def test_prompt_logprobs_are_the_base_models_as_on_the_token_path(pairs, tiny_model, check_pools):
    """The base scores the prompt, once, whatever the prefill chunks: equal to the base alone (token
    path) and to transformers' log-softmax over the whole prompt."""
    base, nudger, engine = pairs["cross"]
    small = NudgeEngine(base, nudger, max_num_batched_tokens=8)          # prefill in chunks
    alone = NudgeEngine(base)
    for e in (engine, small, alone):
        check_pools(e)
    prompt = "The quick brown fox jumps over the lazy dog, twice."
    params = SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=2)
    want = alone.generate(prompt, params)[0].prompt_logprobs
    ids = engine.base.tokenizer.encode(prompt)
    lp = torch.log_softmax(hf_model(base)(torch.tensor([ids])).logits[0].detach().float(), -1)
    assert len(want) == len(ids) > 8 and want[0] is None
    for e in (engine, small):
        got = e.generate(prompt, params, NudgeParams(gamma=0.3))[0].prompt_logprobs
        assert len(got) == len(ids) and got[0] is None
        for p, (g, w) in enumerate(zip(got[1:], want[1:]), start=1):
            assert list(g) == list(w) and list(g)[0] == ids[p]
            for t, v in g.items():
                assert v == pytest.approx(w[t], abs=1e-4) and v == pytest.approx(float(lp[p - 1, t]), abs=1e-4)
