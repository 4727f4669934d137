"""The engine with a base model alone: greedy equals transformers, logprobs, stops, pools, streaming."""
from __future__ import annotations

import json
import random
import shutil
import zlib

import pytest
import torch

from nudge_engine.engine import NudgeEngine
from nudge_engine.engine.sampling_params import SamplingParams
from nudge_engine.model.tokenizer import IncrementalDetokenizer, Tokenizer

from conftest import FAMILIES
from reference import hf_greedy, hf_model, next_logits

GREEDY = SamplingParams(max_tokens=12, temperature=0)


def random_prompts(vocab: int, n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(8, vocab) for _ in range(rng.randint(1, 30))] for _ in range(n)]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_transformers_whatever_the_batch(family, tiny_model, check_pools):
    folder = tiny_model(family)
    engine = NudgeEngine(folder)
    check_pools(engine)
    prompts = random_prompts(engine.base.config.vocab_size, 16, seed=zlib.crc32(family.encode()) % 1000)  # the same every run
    batch = engine.generate(prompts, GREEDY)
    for prompt, out in zip(prompts, batch):
        assert out.token_ids == hf_greedy(folder, prompt, GREEDY.max_tokens, engine.eos_ids)
        assert set(out.sources) == {"base"}
    alone = engine.generate(prompts[5], GREEDY)[0]
    shuffled = list(reversed(prompts))
    again = engine.generate(shuffled, GREEDY)
    assert alone.token_ids == batch[5].token_ids
    assert [o.token_ids for o in reversed(again)] == [o.token_ids for o in batch]


def test_logprobs_and_prompt_logprobs_equal_transformers(tiny_model, check_pools):
    folder = tiny_model("llama")
    engine = NudgeEngine(folder)
    check_pools(engine)
    model = hf_model(folder)
    prompt = random_prompts(engine.base.config.vocab_size, 1, seed=7)[0] + [9, 10]
    out = engine.generate(prompt, SamplingParams(max_tokens=6, temperature=0, logprobs=3, prompt_logprobs=2))[0]
    assert len(out.logprobs) == len(out.token_ids)
    for i, (tok, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        ref = torch.log_softmax(next_logits(model, prompt + out.token_ids[:i]), -1)
        assert list(entry)[0] == tok and len(entry) <= 4
        for t, lp in entry.items():
            assert abs(lp - float(ref[t])) <= 1e-4 * max(1.0, abs(float(ref[t])))
        assert set(ref.topk(3).indices.tolist()) <= set(entry)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    with torch.no_grad():
        full = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), -1)
    for j in range(1, len(prompt)):
        entry = out.prompt_logprobs[j]
        assert abs(entry[prompt[j]] - float(full[j - 1, prompt[j]])) <= 1e-4 * max(1.0, abs(float(full[j - 1, prompt[j]])))


def test_stop_string_across_token_boundary_cuts_text(tiny_model, check_pools):
    folder = tiny_model("llama")
    engine = NudgeEngine(folder)
    check_pools(engine)
    prompt = "The quick brown fox"
    free = engine.generate(prompt, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0]
    pieces = [engine.tokenizer.decode(free.token_ids[:i]) for i in range(len(free.token_ids) + 1)]
    # A stop that starts inside one token's text and ends inside a later one.
    cut = next(i for i in range(2, len(pieces) - 1) if len(pieces[i]) - len(pieces[i - 1]) >= 2
               and len(pieces[i + 1]) > len(pieces[i]))
    start = len(pieces[cut]) - 1
    stop = free.text[start:start + 2]
    want = free.text[:free.text.find(stop)]
    out = engine.generate(prompt, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, stop=[stop]))[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == want
    kept = engine.generate(prompt, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, stop=[stop],
                                                  include_stop_str_in_output=True))[0]
    assert kept.text == want + stop


def test_eos_list_from_generation_config_ends_request(tiny_model, tmp_path, check_pools):
    src = tiny_model("llama")
    free = NudgeEngine(src).generate([5, 6, 7], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    folder = tmp_path / "eos"
    shutil.copytree(src, folder)
    eos = [free.token_ids[4], 100000 + 1]  # a list, with an id the model never emits
    gen = json.loads((folder / "generation_config.json").read_text())
    gen["eos_token_id"] = eos
    (folder / "generation_config.json").write_text(json.dumps(gen))
    engine = NudgeEngine(folder)
    check_pools(engine)
    out = engine.generate([5, 6, 7], SamplingParams(max_tokens=12, temperature=0))[0]
    first = free.token_ids.index(eos[0])
    assert out.token_ids == free.token_ids[:first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == eos[0]
    length = engine.generate([5, 6, 7], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))[0]
    assert length.finish_reason == "length" and len(length.token_ids) == 3
    stop_id = engine.generate([5, 6, 7], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                                        stop_token_ids=[free.token_ids[2]]))[0]
    assert stop_id.token_ids == free.token_ids[:3] and stop_id.finish_reason == "stop"


def test_tiny_pool_preempts_and_keeps_outputs(tiny_model, check_pools):
    folder = tiny_model("qwen2")
    small = NudgeEngine(folder, num_blocks=8, max_num_batched_tokens=48)
    check_pools(small)
    prompts = random_prompts(small.base.config.vocab_size, 16, seed=11)
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    got = small.generate(prompts, params)
    assert small.stats.preemptions > 0
    # Against the obvious reference, not another engine: preemption must not change a token.
    assert [o.token_ids for o in got] == [hf_greedy(folder, p, 20) for p in prompts]


def test_aborting_a_stream_frees_blocks_at_once(tiny_model, check_pools):
    engine = NudgeEngine(tiny_model("llama"))
    check_pools(engine)
    other = engine.add_request([1, 2, 3, 4], SamplingParams(max_tokens=30, temperature=0))
    stream = engine.stream([5, 6, 7], SamplingParams(max_tokens=30, temperature=0))
    next(stream)
    used = engine.base.pool.num_blocks - engine.base.pool.num_free
    stream.close()
    assert engine.base.pool.num_blocks - engine.base.pool.num_free < used
    engine.abort(other)


@pytest.mark.parametrize("style", ["bytelevel", "metaspace"])
def test_incremental_detokenizer_emits_whole_characters(style, tiny_model):
    """Multi-byte characters split across tokens come out whole, and the pieces join to the decode."""
    tok = Tokenizer(tiny_model("llama", style))
    for prompt, text in (("Say:", " naïve café 日本語 🙂 and ∑ done"), ("x", "plain words only"), ("", "ümlaut")):
        prompt_ids = tok.encode(prompt) if prompt else []
        ids = tok.encode(prompt + text, add_special_tokens=False)[len(tok.encode(prompt, add_special_tokens=False)):]
        detok = IncrementalDetokenizer.after_prompt(tok, prompt_ids)
        pieces = [detok.add(t) for t in ids] + [detok.flush()]
        assert all("\ufffd" not in p for p in pieces)
        full, head = tok.decode(prompt_ids + ids), tok.decode(prompt_ids)
        assert "".join(pieces) == full[len(head):]
        if any(ord(c) > 127 for c in text):  # some character really was split across tokens
            assert sum(1 for p in pieces if p) < len(ids)


@pytest.mark.parametrize("style", ["bytelevel", "metaspace"])
def test_stream_joins_to_the_generated_text(style, tiny_model, check_pools):
    engine = NudgeEngine(tiny_model("llama", style))
    check_pools(engine)
    for prompt in ("naïve café 日本語 🙂 end", "Hello there"):
        params = SamplingParams(max_tokens=24, temperature=1.0, seed=3, ignore_eos=True)
        pieces = list(engine.stream(prompt, params))
        whole = engine.generate(prompt, params)[0]
        assert [t for d in pieces for t in d.token_ids] == whole.token_ids
        assert "".join(d.text for d in pieces) == whole.text
        assert [s for d in pieces for s in d.sources] == whole.sources
        assert [d.finish_reason for d in pieces][-1] == "length"
        assert all(d.finish_reason is None for d in pieces[:-1])


def test_same_seed_same_output_whatever_the_batch(tiny_model, check_pools):
    engine = NudgeEngine(tiny_model("llama"))
    check_pools(engine)
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, top_k=50, seed=1234)
    alone = engine.generate("Once upon a time", params)[0]
    others = [SamplingParams(max_tokens=12, temperature=1.0, seed=s) for s in range(5)]
    batch = engine.generate(["a", "Once upon a time", "b c d", "e", "f"], [others[0], params] + others[2:])
    assert batch[1].token_ids == alone.token_ids
    different = engine.generate("Once upon a time", SamplingParams(max_tokens=12, temperature=0.9, seed=99))[0]
    assert different.token_ids != alone.token_ids


@pytest.mark.parametrize("bad, message", [
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(top_k=-3), "top_k"),
    (dict(min_p=2.0), "min_p"),
    (dict(logprobs=1000), "logprobs"),
    (dict(stop=[""]), "stop"),
])
def test_invalid_sampling_params_raise_clear_value_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**bad)


def test_bad_prompts_are_clear_errors_and_leave_others_intact(tiny_model, check_pools):
    engine = NudgeEngine(tiny_model("llama"))
    check_pools(engine)
    keep = engine.add_request([1, 2, 3], GREEDY)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add_request([1, 10**9], GREEDY)
    with pytest.raises(ValueError, match="context"):
        engine.add_request([1] * 600, GREEDY)
    with pytest.raises(ValueError, match="prompt"):
        engine.add_request(3.5, GREEDY)
    while engine.has_unfinished():
        engine.step()
    assert keep not in engine.requests


def test_stream_never_shows_text_a_stop_string_later_cuts(tiny_model, check_pools):
    engine = NudgeEngine(tiny_model("llama"))
    check_pools(engine)
    free = engine.generate("The quick brown fox", SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0]
    stop = free.text[len(free.text) // 2:len(free.text) // 2 + 3]
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, stop=[stop])
    final = engine.generate("The quick brown fox", params)[0]
    shown = ""
    for delta in engine.stream("The quick brown fox", params):
        shown += delta.text
        assert final.text.startswith(shown)
    assert shown == final.text and final.finish_reason == "stop"


def test_building_an_engine_imports_neither_dynamo_nor_triton(tiny_model):
    """Start-up stays light, and the Triton interpreter can still be switched on after an engine exists."""
    import subprocess
    import sys
    code = ("import sys; from nudge_engine.engine import NudgeEngine; "
            f"NudgeEngine({str(tiny_model('llama'))!r}); "
            "print(sorted(m for m in ('torch._dynamo', 'triton') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
