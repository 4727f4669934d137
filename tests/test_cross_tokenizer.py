"""Cross-tokenizer nudging (NUDGING.md section 7): the engine equals a slow full-forward reference."""
from __future__ import annotations

import json
import logging
import random
import shutil

import pytest

from nudge_engine.pairing.spans import decode_spans
from nudge_engine.pairing.wordpieces import WordPieces, split_pieces
from nudge_engine.engine import NudgeEngine
from nudge_engine.engine.sampling_params import NudgeParams, SamplingParams
from nudge_engine.model.tokenizer import Tokenizer

from reference import eos_ids, hf_greedy
from reference_cross import BASE, NUDGER, TokenizerBytes, cross_nudging

MAX_TOKENS = 10
GAMMAS = (0.0, 0.2, 0.4, 1.5)
DRAFTS = (0, 4)
# Multi-byte characters: some only reach the tiny tokenizers as single bytes (CJK is byte fallback).
PROMPTS = ["The quick brown fox", "Once upon a time, é", "日本 and the sea\n", "x"]
# (base, nudger): (family, tokenizer style); byte-level base with a `▁` nudger, and the reverse.
PAIRS = [(("llama", "bytelevel"), ("llama3", "metaspace")),
         (("llama3", "metaspace"), ("llama", "bytelevel"))]


@pytest.fixture(scope="module", params=PAIRS, ids=lambda p: f"{p[0][1]}-base-{p[1][1]}-nudger")
def pair(request, tiny_model):
    base, nudger = (tiny_model(*m) for m in request.param)
    return base, nudger, NudgeEngine(base, nudger, max_num_seqs=64)


def reference(engine, folders, prompt: str, gamma: float, roa: bool = True, max_tokens: int = MAX_TOKENS):
    """The slow reference with its own byte tables, word splitting and end tokens (from the folders)."""
    ids = (engine.base.tokenizer.encode(prompt), engine.nudger.tokenizer.encode(prompt))
    wps = tuple(TokenizerBytes(f) for f in folders)
    return cross_nudging(folders, wps, ids, gamma, roa, max_tokens, tuple(eos_ids(f) for f in folders),
                         engine.nudger_context_limit)


# ---------------------------------------------------------------- word pieces
@pytest.mark.parametrize("style", ["bytelevel", "metaspace"])
def test_word_pieces_are_byte_exact_with_no_prefix_space_and_no_specials(tiny_model, style):
    tok = Tokenizer(tiny_model("llama", style))
    wp = WordPieces(tok)
    rng = random.Random(0)
    alphabet = [b"a", b"b", b"the", b" ", b"\n", b"\t", b"\r", "é".encode(), "日".encode(), b"<s>", b"\xe6", b"\x97"]
    for _ in range(500):
        data = b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 10)))
        ids = wp.encode(data)
        assert wp.bytes_of(ids) == data                  # byte-exact, even for cut characters
        assert not set(ids) & wp.special                 # "<s>" in text is text
        # Word by word: converting pieces one at a time gives the same tokens (caches only grow).
        assert [t for p in split_pieces(data) for t in wp.encode(p)] == ids
    # No added prefix space: "foo" stays "foo", " foo" keeps its one space.
    assert wp.bytes_of(wp.encode(b"foo")) == b"foo" and wp.bytes_of(wp.encode(b" foo")) == b" foo"
    assert split_pieces(b"a  b\n\nc") == [b"a", b" ", b" b", b"\n", b"\nc"]
    # The engine's conversion equals the reference's, written from NUDGING.md with `tokenizers`.
    ref = TokenizerBytes(tiny_model("llama", style))
    assert ref.token_bytes == wp.token_bytes
    for _ in range(300):
        data = b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 10)))
        assert wp.encode(data) == ref.encode(data), data
    # The token -> bytes table agrees with the tokenizer's own encode and decode on ordinary text.
    for text in ["Hello world", "héllo 日本語\nok", " two  spaces"]:
        ids = tok.encode(text, add_special_tokens=False)
        prefix = " " if style == "metaspace" else ""      # the tokenizer's own prepended `▁`
        assert wp.bytes_of(ids).decode() == prefix + text
        assert tok.decode(ids) == text


def test_spans_decode_holds_a_cut_character_for_the_span_that_completes_it():
    e_acute = "é".encode()
    spans = decode_spans([(BASE, b"ab" + e_acute[:1]), (NUDGER, e_acute[1:] + b" c"), (BASE, b"\xe6")])
    assert spans == [("ab", "base"), ("é c", "nudger"), ("\ufffd", "base")]


# ---------------------------------------------------------------- engine == reference
def test_engine_equals_reference_for_every_gamma_and_k_in_one_mixed_batch(pair, check_pools):
    base, nudger, engine = pair
    check_pools(engine)
    cases = [(p, g, k, True) for p in PROMPTS[:3] for g in GAMMAS for k in DRAFTS]
    cases += [(PROMPTS[3], 0.4, k, roa) for k in DRAFTS for roa in (True, False)]
    random.Random(0).shuffle(cases)
    outs = engine.generate([c[0] for c in cases], SamplingParams(max_tokens=MAX_TOKENS, temperature=0),
                           [NudgeParams(gamma=g, draft_tokens=k, resume_on_agreement=roa) for _, g, k, roa in cases])
    refs, handoffs = {}, set()
    for (prompt, gamma, k, roa), out in zip(cases, outs):
        key = (prompt, gamma, roa)
        if key not in refs:
            refs[key] = reference(engine, (base, nudger), prompt, gamma, roa)
        ref, what = refs[key], f"{prompt!r} gamma={gamma} k={k} roa={roa}"
        assert (out.text, out.spans) == (ref.text, ref.spans), what
        assert (out.token_ids, out.sources, out.finish_reason) == (ref.token_ids, ref.sources, ref.finish_reason), what
        assert "".join(t for t, _ in out.spans) == out.text
        assert len(out.token_ids) <= MAX_TOKENS
        names = [name for _, name in out.spans]
        handoffs.update(zip(names, names[1:]))
    # The comparison proves little unless both handoff directions happen and drafts are checked.
    assert handoffs == {("base", "nudger"), ("nudger", "base")}
    drafting = [o for c, o in zip(cases, outs) if c[2] > 0]
    # (Unrelated random models almost never agree across tokenizers: acceptance is proven by the twin test.)
    assert sum(o.drafted_tokens for o in drafting) >= 20


def test_gamma_zero_is_the_base_greedy_text_and_above_one_the_nudgers(pair, check_pools):
    base, nudger, engine = pair
    check_pools(engine)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    base_ids = [hf_greedy(base, engine.base.tokenizer.encode(p), MAX_TOKENS, engine.eos[BASE]) for p in PROMPTS]
    # Enough nudger tokens to cover MAX_TOKENS base tokens of its text (byte fallback: 3 per CJK char).
    nudger_ids = [hf_greedy(nudger, engine.nudger.tokenizer.encode(p), 3 * MAX_TOKENS, engine.eos[NUDGER])
                  for p in PROMPTS]
    for k in DRAFTS:
        zero = engine.generate(PROMPTS, params, NudgeParams(gamma=0.0, draft_tokens=k))
        above = engine.generate(PROMPTS, params, NudgeParams(gamma=1.5, draft_tokens=k, resume_on_agreement=False))
        for z, a, want, theirs in zip(zero, above, base_ids, nudger_ids):
            assert z.token_ids == want and set(z.sources) == {"base"}
            assert z.text == engine.wp[BASE].bytes_of(want).decode("utf-8", "replace")
            # The nudger's greedy text, cut where the base's max_tokens tokens of it end.
            end = len(engine.wp[BASE].bytes_of(a.token_ids))
            assert a.text == engine.wp[NUDGER].bytes_of(theirs)[:end].decode("utf-8", "replace")
            assert [name for _, name in a.spans] == ["nudger"] and set(a.sources) == {"nudger"}


def twin_with_another_tokenizer(folder, out):
    """The same model under a tokenizer that differs in one unused special piece: the cross path
    runs, yet both models want the same text, so drafts get accepted and handoffs are frequent."""
    shutil.copytree(folder, out)
    spec = json.loads((out / "tokenizer.json").read_text())
    for added in spec["added_tokens"]:
        if added["content"] == "<|system|>":
            added["content"] = "<|sys|>"
    spec["model"]["vocab"]["<|sys|>"] = spec["model"]["vocab"].pop("<|system|>")
    (out / "tokenizer.json").write_text(json.dumps(spec))
    return out


def test_drafts_of_an_agreeing_nudger_are_accepted_and_output_stays_exact(tiny_model, tmp_path, check_pools):
    base = tiny_model("llama", "bytelevel")
    twin = twin_with_another_tokenizer(base, tmp_path / "twin")
    engine = NudgeEngine(base, twin)
    check_pools(engine)
    assert engine.pairing == "cross-tokenizer"
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    plain = engine.generate(PROMPTS, params, NudgeParams(gamma=0.0, draft_tokens=4))
    for prompt, out in zip(PROMPTS, plain):
        assert out.token_ids == hf_greedy(base, engine.base.tokenizer.encode(prompt), MAX_TOKENS, engine.eos[BASE])
    # Speculative decoding with the nudger as drafter: most drafts pass, so fewer rounds than tokens.
    assert sum(o.accepted_tokens for o in plain) > sum(o.drafted_tokens for o in plain) / 2
    assert sum(o.rounds for o in plain) < sum(len(o.token_ids) for o in plain)
    nudged = engine.generate(PROMPTS, params, [NudgeParams(gamma=0.4, draft_tokens=k) for k in (0, 4, 0, 4)])
    for prompt, out in zip(PROMPTS, nudged):
        ref = reference(engine, (base, twin), prompt, 0.4)
        assert (out.text, out.spans, out.token_ids, out.finish_reason) == (ref.text, ref.spans, ref.token_ids,
                                                                         ref.finish_reason)


# ---------------------------------------------------------------- work per handoff
def test_work_per_handoff_is_proportional_to_the_new_text_not_the_prefix(tiny_model, check_pools):
    base, nudger = tiny_model("llama", "bytelevel"), tiny_model("llama3", "metaspace")
    engine = NudgeEngine(base, nudger)
    check_pools(engine)
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 12
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    outs = engine.generate([long_prompt] * 2, params, [NudgeParams(gamma=0.4, draft_tokens=k) for k in DRAFTS])
    for out, k in zip(outs, DRAFTS):
        prompts = {"base": len(out.prompt_token_ids), "nudger": len(engine.nudger.tokenizer.encode(long_prompt))}
        reads = {m: [w for w in out.work if w.model == m] for m in prompts}
        assert len(reads["base"]) >= 2 and len(reads["nudger"]) >= 2, out.spans
        for model, ws in reads.items():
            for i, w in enumerate(ws):
                assert w.converted_tokens <= w.text_bytes               # >= 1 byte per token
                # A read computes the converted tokens, the one token left pending, and (k > 0) the
                # drafting pass's own token; the nudger's first read also prefills its prompt, once.
                first = prompts[model] if (model == "nudger" and i == 0) else 0
                assert w.computed_tokens <= w.converted_tokens + 1 + first, (model, i, w)
        # Over the whole request, each model computed its prompt once and then only new tokens:
        # far less than one more prefill (a re-prefill per handoff would cost a prompt each).
        for model, n in prompts.items():
            budget = n + len(out.token_ids) * 4 + out.drafted_tokens + out.rounds
            assert out.computed_tokens[model] <= budget, (model, out.computed_tokens)
            assert out.computed_tokens[model] - n < n


# ---------------------------------------------------------------- engine mechanics
def test_small_pools_and_chunked_prefill_keep_outputs(tiny_model, check_pools):
    base, nudger = tiny_model("llama", "bytelevel"), tiny_model("llama3", "metaspace")
    big = NudgeEngine(base, nudger)
    small = NudgeEngine(base, nudger, num_blocks=14, max_num_batched_tokens=32)
    check_pools(big)
    check_pools(small)
    prompts = [p * 3 for p in PROMPTS] * 2
    params = SamplingParams(max_tokens=20, temperature=0)
    nudge = [NudgeParams(gamma=g, draft_tokens=k) for g in (0.2, 0.4) for k in (0, 1, 4)] + [NudgeParams()] * 2
    want = big.generate(prompts, params, nudge)
    got = small.generate(prompts, params, nudge)
    assert small.stats.preemptions > 0
    assert [(o.text, o.spans, o.token_ids) for o in got] == [(o.text, o.spans, o.token_ids) for o in want]


def test_stream_joins_to_the_generated_text_and_abort_frees_blocks(tiny_model, check_pools):
    base, nudger = tiny_model("llama3", "metaspace"), tiny_model("llama", "bytelevel")
    engine = NudgeEngine(base, nudger)
    check_pools(engine)
    params, nudge = SamplingParams(max_tokens=MAX_TOKENS, temperature=0), NudgeParams(gamma=0.4, draft_tokens=4)
    for prompt in PROMPTS:
        deltas = list(engine.stream(prompt, params, nudge))
        out = engine.generate(prompt, params, nudge)[0]
        assert "".join(d.text for d in deltas) == out.text
        assert [t for d in deltas for t in d.token_ids] == out.token_ids
        assert deltas[-1].finish_reason == out.finish_reason
    rid = engine.add_request(PROMPTS[0], SamplingParams(max_tokens=40, temperature=0), nudge)
    engine.step()
    engine.abort(rid)
    assert engine.pools_all_free() and not engine.has_unfinished()


def test_pairing_is_picked_logged_and_limits_are_clear(tiny_model, caplog):
    a, b = tiny_model("llama", "bytelevel"), tiny_model("llama3", "metaspace")
    with caplog.at_level(logging.INFO, logger="nudge_engine"):
        cross = NudgeEngine(a, b)
        same = NudgeEngine(a, a)
    assert (cross.pairing, same.pairing) == ("cross-tokenizer", "same-tokenizer")
    assert "cross-tokenizer text path" in caplog.text and "same-tokenizer token path" in caplog.text
    with pytest.raises(ValueError, match="token ids"):
        cross.add_request([5, 6, 7], SamplingParams(temperature=0))
    assert not cross.has_unfinished()


def test_agreement_reads_the_nudgers_next_word_over_up_to_8_tokens(tiny_model):
    """NUDGING.md section 7: the base token's text is compared with the nudger's next word read over at
    most 8 nudger tokens. A nudger spelling the word byte by byte needs len(word) tokens."""
    from types import SimpleNamespace
    base, nudger = tiny_model("llama", "bytelevel"), tiny_model("llama3", "metaspace")
    engine = NudgeEngine(base, nudger)
    ref_base, ref_nudger = TokenizerBytes(base), TokenizerBytes(nudger)
    words = {len(b): t for t, b in enumerate(ref_base.token_bytes)
             if b[:1] == b" " and b[1:].isalpha() and 3 <= len(b) <= 8}
    a = words[max(words)]
    word = ref_base.token_bytes[a]
    spelled = [ref_nudger.byte_token[c] for c in word]           # one `<0xNN>` token per byte
    assert len(spelled) >= 3 and ref_nudger.bytes_of(spelled) == word
    assert engine._agrees(SimpleNamespace(queue=spelled + [ref_nudger.byte_token[32]]), a, 0) is True
    wrong = spelled[:-1] + [ref_nudger.byte_token[ord("#")]]
    assert engine._agrees(SimpleNamespace(queue=wrong + [ref_nudger.byte_token[32]]), a, 0) is False


def test_adaptive_drafting_changes_k_and_never_the_text(pair, check_pools, monkeypatch):
    """Greedy text-path requests with adaptive_drafting: the policy cuts drafts that the base keeps
    rejecting (unrelated models), and the text stays the fixed-k text (exact for every k)."""
    engine = pair[2]
    check_pools(engine)
    policy, picks = engine.draft_policy, []

    def spy(stats, max_k, measured=True):
        picks.append(policy.__class__.choose(policy, stats, max_k, measured))
        return picks[-1]

    monkeypatch.setattr(policy, "choose", spy)
    params = SamplingParams(max_tokens=3 * MAX_TOKENS, temperature=0)
    prompts = PROMPTS * 2
    fixed = engine.generate(prompts, params, [NudgeParams(gamma=g, draft_tokens=4, adaptive_drafting=False)
                                              for g in (0.0, 0.4) for _ in PROMPTS])
    assert picks == []
    adaptive = engine.generate(prompts, params, [NudgeParams(gamma=g, draft_tokens=4, adaptive_drafting=True)
                                                 for g in (0.0, 0.4) for _ in PROMPTS])
    assert [(o.text, o.spans, o.token_ids) for o in adaptive] == [(o.text, o.spans, o.token_ids) for o in fixed]
    assert picks and max(picks) <= 4 and min(picks) < 4, picks
    assert sum(o.drafted_tokens for o in adaptive) < sum(o.drafted_tokens for o in fixed)
