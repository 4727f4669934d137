"""The real server process (`python -m nudge_engine serve`) on a tiny pair, driven by the openai client and httpx.

Two server processes per module run: `server` (plain, shared by most tests) and `guarded` (API key,
fault injection at engine steps 3 and 6, a tiny queue, request chat templates allowed; SIGTERM at
the end). Tests on `guarded` depend on their order: the fault test must be the first to generate.
"""
from __future__ import annotations

import asyncio
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

REPO = Path(__file__).resolve().parents[1]
MAX_BODY = 65536
API_KEY = "test-secret-key"
STARTUP_S = 90


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, base, nudger, log_path: Path, *extra: str, env: dict | None = None):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        cmd = [sys.executable, "-m", "nudge_engine", "serve", "--base", str(base),
               *(["--nudger", str(nudger)] if nudger is not None else []), "--port", str(self.port), "--kv-cache-bytes", str(64 << 20), "--log-level", "warning", *extra]
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not become healthy in {STARTUP_S} s:\n{self.tail()}")

    def tail(self) -> str:
        self.log.flush()
        return self.log_path.read_text()[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def pair(tiny_pair):
    return tiny_pair("llama", "llama", "bytelevel", 0.5)


@pytest.fixture(scope="module")
def server(pair, tmp_path_factory):
    srv = ServerProcess(*pair, tmp_path_factory.mktemp("server") / "server.log",
                        "--max-body-bytes", str(MAX_BODY), "--max-queue", "1024")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def guarded(pair, tmp_path_factory):
    srv = ServerProcess(*pair, tmp_path_factory.mktemp("guarded") / "server.log",
                        "--api-key", API_KEY, "--max-queue", "2", "--max-num-seqs", "2",
                        "--allow-request-chat-template", "--drain-timeout", "30",
                        env={"NUDGE_FAULT_INJECT": "3,6"})
    yield srv
    srv.stop()


def client(srv, key="none") -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=120)


def model_id(srv) -> str:
    return httpx.get(srv.url + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).json()["data"][0]["id"]


def metrics(srv, headers=None) -> dict[str, float]:
    text = httpx.get(srv.url + "/metrics", headers=headers or {}, timeout=30).text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            metric, _, labels = name.partition("{")
            kept = [lab for lab in re.findall(r'[a-z_]+="[^"]*"', labels) if not lab.startswith("model_name=")]
            out[metric + ("{" + ",".join(kept) + "}" if kept else "")] = float(value)
    return out


def wait_pools_free(srv, headers=None, timeout=30.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(srv, headers)
        free = {k: v for k, v in m.items() if k.startswith("nudge_kv_blocks_free")}
        total = {k.replace("_free", "_total"): v for k, v in free.items()}
        if len(free) == 2 and all(m[k] == v for k, v in total.items()) and m["nudge_requests_running"] == 0:
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"KV pools not free after {timeout} s: {free} of {total}")
        time.sleep(0.2)


def assert_error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, (resp.status_code, resp.text)
    body = resp.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    return err


def extra(obj, name):
    return (obj.model_extra or {}).get(name)


# ---------------------------------------------------------------------------- basics
def test_models_and_health(server, pair):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    models = client(server).models.list().data
    assert len(models) == 1
    m = models[0]
    assert m.id == str(pair[0])
    assert extra(m, "nudger") == str(pair[1]) and extra(m, "pairing") == "same-tokenizer"


@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, {"temperature": 0.9, "top_p": 0.95, "seed": 1234}],
                         ids=["greedy", "seeded"])
def test_completion_stream_equals_non_stream(server, sampling):
    c = client(server)
    kw = dict(model=model_id(server), prompt="Once upon a time", max_tokens=24, **sampling)
    full = c.completions.create(**kw)
    choice = full.choices[0]
    assert choice.finish_reason in ("stop", "length")
    sources = extra(choice, "sources")
    assert len(sources) == full.usage.completion_tokens and set(sources) <= {"base", "nudger"}
    assert math.isclose(extra(choice, "nudged_fraction"), sources.count("nudger") / len(sources))

    chunks = list(c.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    content = chunks[:-1]
    assert "".join(ch.choices[0].text for ch in content) == choice.text
    assert sum((extra(ch.choices[0], "sources") for ch in content), []) == sources
    reasons = [ch.choices[0].finish_reason for ch in content]
    assert reasons[-1] == choice.finish_reason and reasons.count(None) == len(reasons) - 1
    assert extra(content[-1].choices[0], "nudged_fraction") == extra(choice, "nudged_fraction")


@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, {"temperature": 1.0, "seed": 7}], ids=["greedy", "seeded"])
def test_chat_stream_equals_non_stream(server, sampling):
    c = client(server)
    kw = dict(model=model_id(server), messages=[{"role": "system", "content": "Be brief."},
                                                {"role": "user", "content": "Tell me about the sea."}],
              max_tokens=20, extra_body={"response_prefix": "Answer:"}, **sampling)
    full = c.chat.completions.create(**kw)
    choice = full.choices[0]
    assert choice.message.role == "assistant"
    chunks = list(c.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == full.usage.total_tokens
    content = chunks[:-1]
    assert "".join(ch.choices[0].delta.content or "" for ch in content) == choice.message.content
    assert sum((extra(ch.choices[0], "sources") or [] for ch in content), []) == extra(choice, "sources")
    reasons = [ch.choices[0].finish_reason for ch in content]
    assert reasons[-1] == choice.finish_reason and reasons.count(None) == len(reasons) - 1


def test_n_choices_and_batch_prompts(server):
    c = client(server)
    kw = dict(model=model_id(server), prompt="The cat", max_tokens=8, temperature=1.0, seed=5, n=2)
    full = c.completions.create(**kw)
    assert [ch.index for ch in full.choices] == [0, 1]
    texts = {0: "", 1: ""}
    finishes = {0: [], 1: []}
    for chunk in c.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            texts[ch.index] += ch.text
            finishes[ch.index].append(ch.finish_reason)
    assert [texts[0], texts[1]] == [ch.text for ch in full.choices]
    assert all(f[-1] is not None and f.count(None) == len(f) - 1 for f in finishes.values())
    batch = c.completions.create(model=model_id(server), prompt=["The cat", "A dog"], max_tokens=4, temperature=0)
    assert len(batch.choices) == 2 and batch.usage.completion_tokens == sum(
        len(extra(ch, "sources")) for ch in batch.choices)


def test_logprobs(server):
    c = client(server)
    out = c.completions.create(model=model_id(server), prompt="Hello", max_tokens=6, temperature=0, logprobs=2)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == out.usage.completion_tokens
    assert all(v <= 0 for v in lp.token_logprobs) and all(1 <= len(t) <= 2 for t in lp.top_logprobs)
    chat = c.chat.completions.create(model=model_id(server), messages=[{"role": "user", "content": "hi"}],
                                     max_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)


def test_stop_string_streams_the_same_text(server):
    c = client(server)
    kw = dict(model=model_id(server), prompt="In the morning", max_tokens=30, temperature=0)
    text = c.completions.create(**kw).choices[0].text
    stop = next((text[i:i + 2] for i in range(4, len(text) - 2)
                 if "\ufffd" not in text[i:i + 2] and text[i:i + 2].strip()), None)
    if stop is None:
        pytest.skip("no usable stop string in this output")
    out = c.completions.create(stop=[stop], **kw).choices[0]
    assert out.finish_reason == "stop" and out.text == text[: text.index(stop)]
    assert extra(out, "stop_reason") == stop
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(stop=[stop], stream=True, **kw))
    assert streamed == out.text


def test_nudging_settings(server):
    c = client(server)
    kw = dict(model=model_id(server), prompt="A story", max_tokens=10, temperature=0)
    base_only = c.completions.create(extra_body={"gamma": 0.0}, **kw).choices[0]
    assert set(extra(base_only, "sources")) == {"base"} and extra(base_only, "nudged_fraction") == 0
    # gamma > 1: the nudger writes everything (without resume_on_agreement the base never takes a word back)
    nudger_only = c.completions.create(extra_body={"gamma": 2.0, "draft_tokens": 2, "resume_on_agreement": False},
                                       **kw).choices[0]
    assert set(extra(nudger_only, "sources")) == {"nudger"} and extra(nudger_only, "nudged_fraction") == 1
    # base_prompt: the base reads its own prompt, the nudger reads `prompt`
    two = c.completions.create(extra_body={"gamma": 0.0, "base_prompt": "A story"}, model=kw["model"],
                               prompt="Something else entirely", max_tokens=10, temperature=0).choices[0]
    assert two.text == base_only.text


# ---------------------------------------------------------------------------- bad input
def _post(srv, path, content: bytes, headers=None) -> httpx.Response:
    return httpx.post(srv.url + path, content=content, timeout=60,
                      headers={"Content-Type": "application/json", **(headers or {})})


BAD_COMPLETIONS = [
    ("malformed json", b'{"prompt": ', 400),
    ("array body", b"[1, 2]", 400),
    ("string body", b'"hello"', 400),
    ("empty body", b"", 400),
    ("temperature NaN", b'{"prompt": "hi", "temperature": NaN}', 400),
    ("temperature Infinity", b'{"prompt": "hi", "temperature": Infinity}', 400),
    ("temperature negative", {"prompt": "hi", "temperature": -0.5}, 400),
    ("temperature text", {"prompt": "hi", "temperature": "hot"}, 400),
    ("top_p zero", {"prompt": "hi", "top_p": 0}, 400),
    ("top_p above one", {"prompt": "hi", "top_p": 1.5}, 400),
    ("n zero", {"prompt": "hi", "n": 0}, 400),
    ("n huge", {"prompt": "hi", "n": 1000}, 400),
    ("max_tokens zero", {"prompt": "hi", "max_tokens": 0}, 400),
    ("max_tokens negative", {"prompt": "hi", "max_tokens": -3}, 400),
    ("max_tokens past context", {"prompt": "hi", "max_tokens": 10**6}, 400),
    ("prompt past context", {"prompt": "word " * 3000, "max_tokens": 4}, 400),
    ("prompt wrong type", {"prompt": 5}, 400),
    ("prompt missing", {"max_tokens": 4}, 400),
    ("token id outside vocab", {"prompt": [1, 999999]}, 400),
    ("empty stop string", {"prompt": "hi", "stop": [""]}, 400),
    ("seed text", {"prompt": "hi", "seed": "x"}, 400),
    ("gamma negative", {"prompt": "hi", "gamma": -1}, 400),
    ("draft_tokens too many", {"prompt": "hi", "draft_tokens": 100}, 400),
    ("logprobs too many", {"prompt": "hi", "logprobs": 50}, 400),
    ("presence_penalty", {"prompt": "hi", "presence_penalty": 0.5}, 400),
    ("n x prompts too many", {"prompt": ["a"] * 10, "n": 20}, 400),
    ("base_prompt with a batch", {"prompt": ["a", "b"], "base_prompt": "c"}, 400),
    ("unknown model", {"prompt": "hi", "model": "no-such-model"}, 404),
]

BAD_CHAT = [
    ("no messages", {"messages": []}, 400),
    ("message without role", {"messages": [{"content": "hi"}]}, 400),
    ("unknown role", {"messages": [{"role": "wizard", "content": "hi"}]}, 400),
    ("top_logprobs without logprobs", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400),
    ("chat_template refused", {"messages": [{"role": "user", "content": "hi"}], "chat_template": "{{ 1 }}"}, 400),
    ("unknown model", {"messages": [{"role": "user", "content": "hi"}], "model": "gpt-9"}, 404),
]


@pytest.mark.parametrize("path,case", [("/v1/completions", c) for c in BAD_COMPLETIONS] +
                         [("/v1/chat/completions", c) for c in BAD_CHAT], ids=lambda x: x if isinstance(x, str)
                         else x[0])
def test_bad_input(server, path, case):
    _, body, status = case
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    err = assert_error(_post(server, path, content), status)
    if status == 404:
        assert err["code"] == "model_not_found" and err["param"] == "model"
    assert httpx.get(server.url + "/health").status_code == 200


def test_body_too_large(server):
    big = json.dumps({"prompt": "x" * (MAX_BODY + 10)}).encode()
    assert_error(_post(server, "/v1/completions", big), 413)

    def chunked():  # no Content-Length: the limit holds while reading
        for i in range(0, len(big), 8192):
            yield big[i:i + 8192]

    resp = httpx.post(server.url + "/v1/completions", content=chunked(), headers={"Content-Type": "application/json"})
    assert_error(resp, 413)


def test_serves_after_bad_input(server):
    out = client(server).completions.create(model=model_id(server), prompt="Still", max_tokens=3, temperature=0)
    assert out.choices[0].finish_reason in ("stop", "length")
    assert httpx.get(server.url + "/v1/nope").status_code == 404


# ---------------------------------------------------------------------------- load and disconnects
def test_200_concurrent_streams(server):
    model = model_id(server)

    async def run():
        http = httpx.AsyncClient(limits=httpx.Limits(max_connections=250, max_keepalive_connections=250),
                                 timeout=180)
        c = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, http_client=http)

        async def one(i):
            stream = await c.completions.create(model=model, prompt=f"Request {i} says", max_tokens=3,
                                                temperature=0.8, seed=i, stream=True, extra_body={"draft_tokens": 1})
            text, reasons = "", []
            async for chunk in stream:
                text += chunk.choices[0].text
                reasons.append(chunk.choices[0].finish_reason)
            return text, reasons

        try:
            return await asyncio.gather(*(one(i) for i in range(200)))
        finally:
            await http.aclose()

    results = asyncio.run(run())
    assert len(results) == 200
    for _, reasons in results:
        assert reasons[-1] in ("stop", "length") and reasons.count(None) == len(reasons) - 1
    wait_pools_free(server)


def test_disconnects_free_the_pools(server):
    model = model_id(server)
    before = metrics(server).get('nudge_requests_finished_total{finish_reason="abort"}', 0)

    async def run():
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=60), timeout=120) as http:
            async def one(i):
                body = {"model": model, "prompt": f"Client {i}", "max_tokens": 400, "ignore_eos": True,
                        "temperature": 0.7, "seed": i, "stream": True}
                async with http.stream("POST", server.url + "/v1/completions", json=body) as resp:
                    assert resp.status_code == 200
                    async for line in resp.aiter_lines():
                        if line.startswith("data: {"):
                            return True    # leaves mid-stream: the connection closes
                return False

            return await asyncio.gather(*(one(i) for i in range(50)))

    assert all(asyncio.run(run()))
    # A non-streaming client that gives up (read timeout) mid-request.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", timeout=httpx.Timeout(10, read=0.5),
                   json={"model": model, "prompt": "Slow", "max_tokens": 450, "ignore_eos": True})
    m = wait_pools_free(server)
    assert m['nudge_requests_finished_total{finish_reason="abort"}'] - before == 51
    assert m["nudge_requests_waiting"] == 0


def test_metrics_names(server):
    m = metrics(server)
    for name in ("nudge_requests_running", "nudge_requests_waiting", 'nudge_kv_blocks_free{model="base"}',
                 'nudge_kv_blocks_free{model="nudger"}', 'nudge_generated_tokens_total{source="base"}',
                 'nudge_generated_tokens_total{source="nudger"}', "nudge_handoffs_total", "nudge_preemptions_total",
                 "nudge_time_to_first_token_seconds_count", "nudge_inter_token_latency_seconds_count",
                 'nudge_prefix_cache_hit_tokens_total{model="base"}', 'nudge_prefix_cache_hit_rate{model="nudger"}'):
        assert name in m, name
    assert m["nudge_time_to_first_token_seconds_count"] > 0 and m['nudge_generated_tokens_total{source="nudger"}'] > 0


# ---------------------------------------------------------------------------- the guarded server (order matters)
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def test_injected_fault_fails_in_flight_requests_then_recovers(guarded):
    c = client(guarded, API_KEY)
    model = model_id(guarded)
    kw = dict(model=model, prompt="A long tale", max_tokens=100, temperature=0,
              extra_body={"ignore_eos": True, "draft_tokens": 1})
    # Engine steps 1-2 run, step 3 raises: the stream gets an error chunk (the client raises APIError).
    got = []
    with pytest.raises(openai.APIError, match="engine failed"):
        for chunk in c.completions.create(stream=True, **kw):
            got.append(chunk.choices[0].text)
    assert got, "tokens of the steps before the fault arrive first"
    assert httpx.get(guarded.url + "/health").status_code == 200
    # Steps 4-5 run, step 6 raises: both choices of a non-streaming request fail with a 500.
    resp = httpx.post(guarded.url + "/v1/completions", headers=AUTH, timeout=120,
                      json={**{k: v for k, v in kw.items() if k != "extra_body"}, **kw["extra_body"], "n": 2})
    err = assert_error(resp, 500)
    assert "engine failed" in err["message"] and err["type"] == "server_error"
    # Recovered: new requests are served, the pools are free, /health is 200.
    out = c.completions.create(model=model, prompt="After", max_tokens=5, temperature=0)
    assert out.choices[0].finish_reason in ("stop", "length")
    assert httpx.get(guarded.url + "/health").json() == {"status": "ok"}
    m = wait_pools_free(guarded, AUTH)
    assert m["nudge_engine_step_failures_total"] == 2


def test_api_key(guarded):
    url = guarded.url
    for path in ("/v1/models", "/metrics"):
        assert_error(httpx.get(url + path), 401)
        assert_error(httpx.get(url + path, headers={"Authorization": "Bearer wrong"}), 401)
        assert httpx.get(url + path, headers=AUTH).status_code == 200
    assert_error(httpx.post(url + "/v1/completions", json={"prompt": "hi"}), 401)
    assert httpx.get(url + "/health").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        client(guarded, "wrong").models.list()


def test_request_chat_template_in_sandbox(guarded):
    c = client(guarded, API_KEY)
    msgs = [{"role": "user", "content": "hi"}]
    template = "{% for m in messages %}{{ m.content }}\n{% endfor %}"
    out = c.chat.completions.create(model=model_id(guarded), messages=msgs, max_tokens=3, temperature=0,
                                    extra_body={"chat_template": template})
    assert out.choices[0].finish_reason in ("stop", "length")
    for evil in ("{{ messages.__class__.__mro__[1].__subclasses__() }}", "{{ cycler.__init__.__globals__.os }}",
                 "{{ 1 / 0 }}"):
        resp = httpx.post(guarded.url + "/v1/chat/completions", headers=AUTH,
                          json={"messages": msgs, "max_tokens": 2, "chat_template": evil})
        assert_error(resp, 400)


def test_queue_full_gives_503(guarded):
    model = model_id(guarded)

    async def run():
        async with httpx.AsyncClient(headers=AUTH, timeout=120) as http:
            async def one(i):
                return await http.post(guarded.url + "/v1/completions", json={
                    "model": model, "prompt": f"Queue {i}", "max_tokens": 30, "ignore_eos": True,
                    "temperature": 0, "draft_tokens": 1})
            return await asyncio.gather(*(one(i) for i in range(10)))

    resps = asyncio.run(run())
    codes = sorted(r.status_code for r in resps)
    assert 200 in codes and 503 in codes and set(codes) <= {200, 503}, codes
    for r in resps:
        if r.status_code == 503:
            assert assert_error(r, 503)["code"] == "server_overloaded"
            assert r.headers["retry-after"] == "1"
    assert httpx.post(guarded.url + "/v1/completions", headers=AUTH,
                      json={"model": model, "prompt": "Next", "max_tokens": 2}).status_code == 200
    wait_pools_free(guarded, AUTH)


def test_sigterm_drains_in_flight_requests(guarded):
    c = client(guarded, API_KEY)
    stream = c.completions.create(model=model_id(guarded), prompt="Drain", max_tokens=40, temperature=0,
                                  stream=True, extra_body={"ignore_eos": True, "draft_tokens": 1})
    chunks = iter(stream)
    first = next(chunks)
    guarded.proc.send_signal(signal.SIGTERM)
    rest = list(chunks)
    assert rest[-1].choices[0].finish_reason == "length"
    assert sum(len(extra(ch.choices[0], "sources")) for ch in [first, *rest]) == 40
    assert guarded.proc.wait(30) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(guarded.url + "/health", timeout=2)


# ---------------------------------------------------------------------------- in process: the engine dies
def test_engine_death_makes_health_503(pair):
    """3 failed steps in a row stop the engine thread: requests get 503 and /health 503 (restart me)."""
    from fastapi.testclient import TestClient

    from nudge_engine.engine import NudgeEngine
    from nudge_engine.server import ServerSettings, build_app

    engine = NudgeEngine(*pair, kv_cache_bytes=16 << 20)
    app = build_app(engine, ServerSettings(model_name="tiny"), fault_steps=frozenset({1, 2, 3}))
    body = {"prompt": "Doomed", "max_tokens": 4}
    with TestClient(app) as http:
        for _ in range(2):
            assert_error(http.post("/v1/completions", json=body), 500)
            assert http.get("/health").status_code == 200       # recovered so far
        assert_error(http.post("/v1/completions", json=body), 500)
        deadline = time.monotonic() + 10
        while http.get("/health").status_code != 503:
            assert time.monotonic() < deadline, "the engine thread should have stopped"
            time.sleep(0.05)
        assert "in a row failed" in http.get("/health").json()["reason"]
        assert http.get("/health").headers["retry-after"] == "1"
        assert assert_error(http.post("/v1/completions", json=body), 503)["code"] == "engine_dead"
        assert "nudge_engine_alive" in http.get("/metrics").text
    assert engine.pools_all_free()


def test_base_alone_in_process(pair):
    """Without a nudger: pairing "base-alone", every token from the base, chat still works."""
    from fastapi.testclient import TestClient

    from nudge_engine.engine import NudgeEngine
    from nudge_engine.server import ServerSettings, build_app

    engine = NudgeEngine(pair[0], kv_cache_bytes=16 << 20)
    with TestClient(build_app(engine, ServerSettings(model_name="base"))) as http:
        info = http.get("/v1/models").json()["data"][0]
        assert info["pairing"] == "base-alone" and info["nudger"] is None
        out = http.post("/v1/chat/completions", json={"model": "base", "messages": [{"role": "user", "content": "hi"}],
                                                      "max_tokens": 4, "temperature": 0}).json()
        choice = out["choices"][0]
        assert set(choice["sources"]) == {"base"} and choice["nudged_fraction"] == 0
        assert out["usage"]["completion_tokens"] == len(choice["sources"])


def test_cross_tokenizer_pair_in_process(tiny_model):
    """Different tokenizers: /v1/models says so, and completions (streamed or not) agree."""
    from fastapi.testclient import TestClient

    from nudge_engine.engine import NudgeEngine
    from nudge_engine.server import ServerSettings, build_app

    engine = NudgeEngine(tiny_model("llama", "bytelevel"), tiny_model("llama", "metaspace", num_layers=1),
                         kv_cache_bytes=16 << 20)
    with TestClient(build_app(engine, ServerSettings(model_name="cross"))) as http:
        assert http.get("/v1/models").json()["data"][0]["pairing"] == "cross-tokenizer"
        body = {"model": "cross", "prompt": "Hello there", "max_tokens": 10, "temperature": 0, "gamma": 0.5}
        whole = http.post("/v1/completions", json=body).json()["choices"][0]
        with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as resp:
            chunks = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {")]
        assert "".join(c["choices"][0]["text"] for c in chunks) == whole["text"]
        assert whole["finish_reason"] == "length" and len(whole["sources"]) == 10
        # Seeded sampling on the text path: the same seed gives the same text, streamed or not.
        sampled = {**body, "temperature": 1.0, "top_p": 0.95, "seed": 7, "n": 2}
        first = [c["text"] for c in http.post("/v1/completions", json=sampled).json()["choices"]]
        assert first == [c["text"] for c in http.post("/v1/completions", json=sampled).json()["choices"]]
        with http.stream("POST", "/v1/completions", json={**sampled, "n": 1, "stream": True}) as resp:
            chunks = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {")]
        assert "".join(c["choices"][0]["text"] for c in chunks) == first[0]
        # Logprobs per written token (pairing/text_logprobs.py): well-formed, joined they are the text.
        for extra in ({}, {"temperature": 1.0, "seed": 3}):
            lp = http.post("/v1/completions", json={**body, **extra, "logprobs": 2}).json()["choices"][0]
            got = lp["logprobs"]
            assert "".join(got["tokens"]).startswith(lp["text"]) and len(got["tokens"]) >= 1
            assert all(isinstance(v, float) and v <= 0 for v in got["token_logprobs"])
            assert all(1 <= len(top) <= 3 for top in got["top_logprobs"])
            assert got["text_offset"] == [sum(map(len, got["tokens"][:i])) for i in range(len(got["tokens"]))]
            with http.stream("POST", "/v1/completions", json={**body, **extra, "logprobs": 2, "stream": True}) as resp:
                chunks = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {")]
            streamed = [t for c in chunks if c["choices"][0]["logprobs"] for t in c["choices"][0]["logprobs"]["tokens"]]
            assert streamed == got["tokens"]
        chat = http.post("/v1/chat/completions", json={"model": "cross", "max_tokens": 6, "temperature": 0,
                                                       "messages": [{"role": "user", "content": "Hi"}],
                                                       "logprobs": True, "top_logprobs": 2}).json()["choices"][0]
        content = chat["logprobs"]["content"]
        assert "".join(c["token"] for c in content).startswith(chat["message"]["content"])
        assert all(isinstance(c["logprob"], float) and len(c["top_logprobs"]) <= 2 for c in content)
        echoed = http.post("/v1/completions", json={**body, "logprobs": 2, "echo": True}).json()["choices"][0]
        prompt_len = len(engine.base.tokenizer.encode("Hello there"))
        assert echoed["text"].startswith("Hello there") and echoed["logprobs"]["token_logprobs"][0] is None
        assert all(isinstance(v, float) for v in echoed["logprobs"]["token_logprobs"][1:prompt_len])
    assert engine.pools_all_free()
