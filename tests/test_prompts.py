"""Prompt forms (NUDGING.md section 6) and the sandboxed chat template."""
from __future__ import annotations

import pytest

from nudge_engine.engine import NudgeEngine
from nudge_engine.engine.prompts import ChatFormat, render_base_chat, tokenize_prompt
from nudge_engine.engine.sampling_params import NudgeParams, SamplingParams
from nudge_engine.model.tokenizer import Tokenizer, render_chat_template

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]


def test_chat_prompt_gives_each_model_its_own_rendering(tiny_model):
    tok = Tokenizer(tiny_model("llama", "metaspace"))
    base, nudger = tokenize_prompt({"messages": MESSAGES, "response_prefix": "Answer:"}, tok, tok, ChatFormat())
    assert base == tok.encode("Be brief.\nWhat is 2+2?\nAnswer:")
    rendered = tok.render_chat(MESSAGES)
    assert "<|user|>" in rendered and rendered.rstrip().endswith("<|assistant|>")
    assert nudger == tok.encode(rendered, add_special_tokens=False)
    assert nudger.count(tok.vocab["<s>"]) <= 1  # no double BOS


def test_base_template_and_per_model_prompts(tiny_model):
    tok = Tokenizer(tiny_model("llama"))
    fmt = ChatFormat(base_template="Q: {user}\n", response_prefix="A:")
    assert render_base_chat(MESSAGES, fmt) == "Q: What is 2+2?\nA:"
    base, nudger = tokenize_prompt({"base": "plain text", "nudger": [5, 6, 7]}, tok, tok, fmt)
    assert base == tok.encode("plain text") and nudger == [5, 6, 7]
    with pytest.raises(ValueError, match="prompt dict"):
        tokenize_prompt({"bogus": 1}, tok, tok, fmt)
    with pytest.raises(ValueError, match="messages"):
        tokenize_prompt({"messages": [{"role": "user"}]}, tok, tok, fmt)


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{% for m in messages %}{{ m.__class__.__init__.__globals__ }}{% endfor %}",
    "{{ messages.append(1) }}",
])
def test_chat_template_runs_in_a_sandbox(template):
    with pytest.raises(ValueError, match="unsafe"):
        render_chat_template(template, [{"role": "user", "content": "x"}], True)


def test_chat_request_runs_end_to_end(tiny_pair, check_pools):
    base, nudger = tiny_pair("llama", "llama", "bytelevel", agreement=0.6)
    engine = NudgeEngine(base, nudger, response_prefix="Answer:")
    check_pools(engine)
    out = engine.generate({"messages": MESSAGES}, SamplingParams(max_tokens=8, temperature=0),
                          NudgeParams(gamma=0.6))[0]
    assert out.prompt_token_ids == engine.tokenizer.encode("Be brief.\nWhat is 2+2?\nAnswer:")
    assert len(out.token_ids) >= 1 and len(out.sources) == len(out.token_ids)


def test_a_base_model_alone_gets_its_own_chat_template_unless_a_base_template_is_given(tiny_model, monkeypatch):
    tok = Tokenizer(tiny_model("llama", "metaspace"))
    chat = {"messages": MESSAGES, "response_prefix": "Sure:"}
    templated = tok.encode(tok.render_chat(MESSAGES) + "Sure:", add_special_tokens=False)
    plain = tok.encode("Be brief.\nWhat is 2+2?\nSure:")
    assert tokenize_prompt(chat, tok, None, ChatFormat()) == (templated, None)
    assert tokenize_prompt(chat, tok, None, ChatFormat(base_chat_template=False)) == (plain, None)
    assert tokenize_prompt({**chat, "base_template": "{system}\n{user}\n"}, tok, None, ChatFormat()) == (plain, None)
    # A request's own template: the base model's when it is alone, the nudger's otherwise.
    own = "{% for m in messages %}[{{ m.content }}]{% endfor %}"
    assert tokenize_prompt({**chat, "chat_template": own}, tok, None, ChatFormat())[0] == \
        tok.encode("[Be brief.][What is 2+2?]Sure:", add_special_tokens=False)
    assert tokenize_prompt({**chat, "chat_template": own}, tok, tok, ChatFormat()) == \
        (plain, tok.encode("[Be brief.][What is 2+2?]", add_special_tokens=False))
    monkeypatch.setattr(tok, "chat_template", None)     # no template: the plain rendering
    assert tokenize_prompt(chat, tok, None, ChatFormat()) == (plain, None)


def test_engine_base_template_argument_forces_the_plain_rendering(tiny_model):
    folder = tiny_model("llama")
    assert NudgeEngine(folder).chat_format.base_chat_template
    forced = NudgeEngine(folder, base_template="{user}\n")
    assert not forced.chat_format.base_chat_template
    out = forced.generate({"messages": MESSAGES}, SamplingParams(max_tokens=1))[0]
    assert out.prompt_token_ids == forced.tokenizer.encode("What is 2+2?\n")
