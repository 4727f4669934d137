"""Issue 12's findings against the real server process, each as the exact request that used to fail.

Every case runs while a well-formed streaming request is in flight on the same engine: that request
must finish normally, and both KV pools must be free afterwards.
"""
from __future__ import annotations

import concurrent.futures
import json
import signal
import socket
import time

import httpx
import pytest
import torch

from test_server import ServerProcess, assert_error, wait_pools_free

CONTEXT = 128          # a short context keeps "the last position" cheap to reach
POOL_BLOCKS = 12       # 12 x 16 = 192 slots per pool: more than one request needs, less than a few
WELL_FORMED = {"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0, "stream": True}


@pytest.fixture(scope="module")
def pair(tiny_pair):
    return tiny_pair("llama", "llama", "bytelevel", 0.5, max_position_embeddings=CONTEXT)


@pytest.fixture(scope="module")
def server(pair, tmp_path_factory):
    srv = ServerProcess(*pair, tmp_path_factory.mktemp("hard") / "server.log", "--num-blocks", "256",
                        "--header-timeout", "1", "--body-timeout", "1", "--max-queue", "4096")
    yield srv
    srv.stop()


def _stream_text(srv, body: dict) -> tuple[str, str | None, list[dict]]:
    """(joined text, finish_reason, chunks) of a completions stream."""
    chunks = []
    with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=120) as resp:
        assert resp.status_code == 200, resp.read()
        for line in resp.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    text = "".join(c["choices"][0]["text"] for c in chunks if c.get("choices"))
    reasons = [c["choices"][0]["finish_reason"] for c in chunks if c.get("choices")]
    return text, reasons[-1] if reasons else None, chunks


def beside_well_formed(srv, send):
    """Runs send() while a well-formed stream is in flight; returns send()'s result after checking the stream."""
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        good = pool.submit(_stream_text, srv, WELL_FORMED)
        time.sleep(0.05)
        result = pool.submit(send).result()
        text, reason, _ = good.result()
    assert reason == "length" and text
    wait_pools_free(srv)
    return result


def post(srv, path: str, body) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(srv.url + path, content=content, timeout=120, headers={"Content-Type": "application/json"})


# ---------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("body", [
    {"prompt": "Hi", "top_p": 1e-300, "temperature": 1, "max_tokens": 2},
    {"prompt": "Hi", "temperature": 1e-40, "max_tokens": 2},
    {"prompt": "Hi", "temperature": 1, "nudger_top_p": 1e-300, "nudger_temperature": 1e-44, "max_tokens": 4,
     "gamma": 0.9},
    {"prompt": "Hi", "top_k": -1, "temperature": 0.7, "seed": 3, "max_tokens": 3},
], ids=["top_p_1e-300", "temperature_1e-40", "nudger_twins", "top_k_-1"])
def test_degenerate_sampling_settings_generate(server, body):
    resp = beside_well_formed(server, lambda: post(server, "/v1/completions", body))
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_sampled_nudging_to_the_last_position(server):
    body = {"prompt": "Hi", "max_tokens": CONTEXT - 2, "temperature": 1, "seed": 2, "ignore_eos": True,
            "gamma": 0.6, "draft_tokens": 8}
    resp = beside_well_formed(server, lambda: post(server, "/v1/completions", body))
    assert resp.status_code == 200, resp.text
    choice = resp.json()["choices"][0]
    assert choice["finish_reason"] == "length" and len(choice["sources"]) == CONTEXT - 2


def test_no_step_failed_and_the_engine_lives(server):
    """The cases above used to fail engine steps (and three in a row stopped the engine): none may now."""
    from test_server import metrics
    m = metrics(server)
    assert m["nudge_engine_step_failures_total"] == 0 and httpx.get(server.url + "/health").status_code == 200


# ---------------------------------------------------------------------------- bad input is a 4xx
SURROGATES = [
    ("/v1/completions", b'{"prompt": "a\\ud800b", "max_tokens": 2}', "prompt"),
    ("/v1/completions", b'{"prompt": "hi", "model": "\\ud800"}', "model"),
    ("/v1/completions", b'{"prompt": ["ok", "\\udfff"]}', "prompt"),
    ("/v1/chat/completions", b'{"messages": [{"role": "\\ud800", "content": "hi"}]}', "messages"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x\\udbff"}]}', "messages"),
]


@pytest.mark.parametrize("path,content,param", SURROGATES, ids=lambda x: x if isinstance(x, str) else None)
def test_lone_surrogates_are_400(server, path, content, param):
    err = assert_error(beside_well_formed(server, lambda: post(server, path, content)), 400)
    assert "not valid Unicode text" in err["message"] and err["param"] == param


UNSUPPORTED = ["repetition_penalty", "functions", "function_call", "tool_choice", "min_tokens", "guided_json",
               "max_completion_tokens", "structured_outputs", "logit_bias"]
VALUES = {"repetition_penalty": 1.3, "functions": [{"name": "f"}], "function_call": "auto", "tool_choice": "auto",
          "min_tokens": 4, "guided_json": {"type": "object"}, "max_completion_tokens": 5,
          "structured_outputs": {"json": {}}, "logit_bias": {"5": 3.0}}


@pytest.mark.parametrize("field", UNSUPPORTED)
def test_unsupported_fields_are_refused(server, field):
    body = {"prompt": "hi", "max_tokens": 2, field: VALUES[field]}
    err = assert_error(beside_well_formed(server, lambda: post(server, "/v1/completions", body)), 400)
    assert err["param"] == field and field in err["message"]


@pytest.mark.parametrize("field,off", [("repetition_penalty", 1.0), ("min_tokens", 0), ("tool_choice", "none")])
def test_unsupported_fields_at_their_off_value_are_accepted(server, field, off):
    resp = post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 2, field: off})
    assert resp.status_code == 200, resp.text


def test_request_larger_than_the_pool_is_400_at_admission(pair, tmp_path):
    srv = ServerProcess(*pair, tmp_path / "small.log", "--num-blocks", "6")     # 96 slots < 128 context
    try:
        body = {"prompt": "Hi", "max_tokens": 110}
        err = assert_error(beside_well_formed(srv, lambda: post(srv, "/v1/completions", body)), 400)
        assert "KV blocks" in err["message"] and "whole pool" in err["message"]
        assert httpx.get(srv.url + "/health").status_code == 200
    finally:
        srv.stop()


# ---------------------------------------------------------------------------- responses and limits
def test_large_responses_are_built_off_the_event_loop(pair, monkeypatch):
    """n choices x many tokens x 20 top logprobs is megabytes of JSON (28 MB for n = 128, 500 tokens):
    built on the event loop it stalls every other client, /health included, for seconds. The logprobs
    objects must be built where no event loop runs (a worker thread)."""
    import asyncio

    from fastapi.testclient import TestClient

    from nudge_engine.engine import NudgeEngine
    from nudge_engine.server import ServerSettings, build_app
    from nudge_engine.server import protocol as P

    built_on_loop = []
    real = P.completion_logprobs

    def spy(*args, **kwargs):
        try:
            asyncio.get_running_loop()
            built_on_loop.append(True)
        except RuntimeError:
            built_on_loop.append(False)
        return real(*args, **kwargs)

    monkeypatch.setattr(P, "completion_logprobs", spy)
    engine = NudgeEngine(*pair, kv_cache_bytes=16 << 20)
    with TestClient(build_app(engine, ServerSettings(model_name="m"))) as http:
        body = {"prompt": "Hi", "n": 8, "max_tokens": 20, "logprobs": 20, "ignore_eos": True, "temperature": 1,
                "seed": 1}
        out = http.post("/v1/completions", json=body).json()
        assert len(out["choices"]) == 8 and all(len(c["logprobs"]["tokens"]) == 20 for c in out["choices"])
        assert built_on_loop and not any(built_on_loop)
    assert engine.pools_all_free()


def test_head_health(server):
    resp = httpx.head(server.url + "/health")
    assert resp.status_code == 200 and resp.content == b""


def test_openapi_documents_what_the_server_answers(server):
    spec = httpx.get(server.url + "/openapi.json").json()
    assert "HTTPValidationError" not in json.dumps(spec)
    for path in ("/v1/completions", "/v1/chat/completions"):
        responses = spec["paths"][path]["post"]["responses"]
        assert "422" not in responses
        assert {"200", "400", "401", "404", "413", "500", "503"} <= set(responses)
        assert set(responses["200"]["content"]) == {"application/json", "text/event-stream"}
    metrics = spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert set(metrics) == {"text/plain"}
    assert "head" in spec["paths"]["/health"]


def test_slow_headers_are_cut(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")    # the headers never end
        t0 = time.monotonic()
        assert s.recv(1024) == b""                                        # closed by the server
        assert time.monotonic() - t0 < 8


def test_slow_body_gets_408(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"prompt\": ")                # 90 bytes never come
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(4096)
            assert chunk, data
            data += chunk
    assert data.startswith(b"HTTP/1.1 408")


def test_drain_timeout_ends_streams_with_an_error_and_done(pair, tmp_path):
    srv = ServerProcess(*pair, tmp_path / "drain.log", "--drain-timeout", "0.2")
    lines = []
    try:   # 64 streams x 120 tokens: far more than 0.2 s of work after the first chunk
        body = {"prompt": "Hi", "n": 64, "max_tokens": 120, "ignore_eos": True, "temperature": 1, "seed": 4,
                "stream": True}
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as resp:
            for line in resp.iter_lines():
                if line and not lines:
                    srv.proc.send_signal(signal.SIGTERM)
                if line:
                    lines.append(line)
        assert srv.proc.wait(30) == 0
    finally:
        srv.stop()
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2][6:])
    assert error["error"]["code"] == "server_shutting_down" and "drain time-out" in error["error"]["message"]


# ---------------------------------------------------------------------------- echo
@torch.no_grad()
def test_echo_returns_the_prompts_logprobs(server, pair):
    from reference import hf_model
    prompt = "The quick brown fox jumps"
    resp = beside_well_formed(server, lambda: post(server, "/v1/completions", {
        "prompt": prompt, "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0}))
    assert resp.status_code == 200, resp.text
    choice = resp.json()["choices"][0]
    assert choice["text"].startswith(prompt)
    lp = choice["logprobs"]
    from nudge_engine.model.tokenizer import Tokenizer
    ids = Tokenizer(pair[0]).encode(prompt)
    assert len(lp["tokens"]) == len(ids) + 1
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    # The base model's own log-probabilities of each prompt token, from transformers.
    logits = hf_model(pair[0])(torch.tensor([ids])).logits[0].double()
    expected = torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    got = torch.tensor(lp["token_logprobs"][1:len(ids)], dtype=torch.float64)
    assert torch.allclose(got, expected, atol=1e-4), (got, expected)
    assert all(len(top) == 1 for top in lp["top_logprobs"][1:])

    streamed, _, chunks = _stream_text(server, {"prompt": prompt, "echo": True, "logprobs": 1, "max_tokens": 1,
                                                "temperature": 0, "stream": True})
    assert streamed == choice["text"]
    tokens = sum((c["choices"][0]["logprobs"]["tokens"] for c in chunks if c.get("choices")), [])
    assert tokens == lp["tokens"]


def test_echo_without_logprobs_and_with_token_ids(server):
    resp = post(server, "/v1/completions", {"prompt": [5, 6, 7], "echo": True, "max_tokens": 2, "temperature": 0})
    assert resp.status_code == 200, resp.text
    choice = resp.json()["choices"][0]
    assert choice["logprobs"] is None and len(choice["text"]) > 0
    err = assert_error(post(server, "/v1/completions", {"prompt": "a", "base_prompt": "b", "echo": True}), 400)
    assert err["param"] == "echo"
