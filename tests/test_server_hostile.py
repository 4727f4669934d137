"""Issue 28's findings against the real server process (hostile templates, lone surrogates in keys,
megabyte prompts, slow bodies, advertised limits, the queue, a dead tensor-parallel worker), each as
the exact request that used to fail and variants of it.

Every case runs while a well-formed streaming request is in flight on the same engine: that request
must finish normally, and both KV pools must be free afterwards.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from test_server import ServerProcess, assert_error, metrics, wait_pools_free
from test_server_hardening import WELL_FORMED, beside_well_formed, post

LOOP = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
PLAIN = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"
BUDGET_S = 1.0
KILL_GRACE_S = 2.0           # nudge_engine.model.chat_sandbox.KILL_GRACE_S
BLOCKS, BLOCK_SIZE, CONTEXT = 20, 16, 512
SERVED = BLOCKS * BLOCK_SIZE   # 320 tokens: the pool, not the context, bounds a request
BODY_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def pair(tiny_pair):
    return tiny_pair("llama", "llama", "bytelevel", 0.5)


@pytest.fixture(scope="module")
def loop_pair(pair, tmp_path_factory):
    """The tiny pair, with a nudger whose own chat template runs away (as the GGUF of the issue)."""
    out = tmp_path_factory.mktemp("loop")
    base, nudger = (shutil.copytree(folder, out / folder.name) for folder in pair)
    config = json.loads((nudger / "tokenizer_config.json").read_text())
    (nudger / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": LOOP}))
    return base, nudger


@pytest.fixture(scope="module")
def server(loop_pair, tmp_path_factory):
    srv = ServerProcess(*loop_pair, tmp_path_factory.mktemp("hostile") / "server.log",
                        "--num-blocks", str(BLOCKS), "--allow-request-chat-template", "--chat-template-timeout",
                        str(BUDGET_S), "--body-timeout", str(BODY_TIMEOUT_S), "--max-queue", "4096")
    yield srv
    srv.stop()


class HealthProbe:
    """Polls /health every 50 ms on its own thread; `worst` is the slowest answer (timeouts count 10 s)."""

    def __init__(self, srv):
        self.srv, self.worst, self.codes = srv, 0.0, set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self):
        with httpx.Client(timeout=10) as http:
            while not self._stop.is_set():
                t0 = time.monotonic()
                try:
                    self.codes.add(http.get(self.srv.url + "/health").status_code)
                except httpx.HTTPError:
                    self.codes.add("timeout")
                self.worst = max(self.worst, time.monotonic() - t0)
                self._stop.wait(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def chat(srv, body: dict) -> httpx.Response:
    return post(srv, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], **body})


# ---------------------------------------------------------------------------- item 1: chat templates
def test_a_model_template_that_runs_away_is_found_at_load_and_refused_at_once(server, loop_pair):
    def send():
        t0 = time.monotonic()
        return chat(server, {"max_tokens": 2}), time.monotonic() - t0

    resp, seconds = beside_well_formed(server, send)
    err = assert_error(resp, 400)
    assert f"the chat template of {loop_pair[1]}" in err["message"] and "time budget" in err["message"], err
    assert seconds < 0.5, seconds                 # the budget is not spent again per request
    assert "the chat template of" in server.tail() and "trial render at load" in server.tail()


HOSTILE_REQUEST_TEMPLATES = {
    "nested_range": (LOOP, "time budget"),
    "x_times_1e7": ("{{ 'x'*10000000 }}", "output limit"),
    "center_1e10": ("{{ 'x'|center(10000000000) }}", "memory budget"),
    "only_for_two_messages": ("{% if messages|length > 1 %}" + LOOP + "{% endif %}" + PLAIN, "time budget"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_REQUEST_TEMPLATES))
def test_a_runaway_request_template_fails_alone_and_health_answers(server, case):
    template, says = HOSTILE_REQUEST_TEMPLATES[case]
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]

    def send():
        t0 = time.monotonic()
        resp = post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 2, "chat_template": template})
        return resp, time.monotonic() - t0

    with HealthProbe(server) as probe:
        resp, seconds = beside_well_formed(server, send)
    err = assert_error(resp, 400)
    assert "the request's chat_template" in err["message"] and says in err["message"], err
    assert err["param"] == "chat_template"
    assert seconds < BUDGET_S + KILL_GRACE_S + 2, seconds
    assert probe.codes == {200} and probe.worst < 1.0, (probe.codes, probe.worst)
    ok = post(server, "/v1/chat/completions", {"messages": messages[:1], "max_tokens": 2, "chat_template": template})
    if case == "only_for_two_messages":   # the same template with one message renders and generates
        assert ok.status_code == 200, ok.text


# ---------------------------------------------------------------------------- item 4: lone surrogates in keys
@pytest.mark.parametrize("path,content", [
    ("/v1/completions", b'{"prompt":"abc","\\ud800":1,"max_tokens":4}'),
    ("/v1/completions", b'{"prompt":"abc","max_tokens":4,"stream_options":{"\\udfff":true}}'),
    ("/v1/chat/completions", b'{"messages":[{"role":"user","content":"hi","\\ud800":1}],"max_tokens":4}'),
    ("/v1/chat/completions", b'{"messages":[{"role":"user","content":[{"type":"text","text":"a","\\udbff":2}]}]}'),
], ids=["completions", "nested", "chat_message", "content_part"])
def test_a_lone_surrogate_in_a_key_is_400(server, path, content):
    err = assert_error(beside_well_formed(server, lambda: post(server, path, content)), 400)
    assert "not valid Unicode text" in err["message"] and "\\ud" in err["message"].lower(), err


def test_a_valid_surrogate_pair_in_a_key_is_no_error(server):
    resp = post(server, "/v1/completions", b'{"prompt":"abc","\\ud83d\\ude00":1,"max_tokens":2}')
    assert resp.status_code == 200, resp.text


# ---------------------------------------------------------------------------- item 5: tokenization off the loop
SEND_EIGHT = """
import concurrent.futures, json, sys, httpx
body = {"prompt": "hello world 0 " * 70000, "max_tokens": 2}
with concurrent.futures.ThreadPoolExecutor(8) as pool:
    resps = list(pool.map(lambda _: httpx.post(sys.argv[1] + "/v1/completions", json=body, timeout=300), range(8)))
print(json.dumps([[r.status_code, r.json()["error"]["message"]] for r in resps]))
"""


def test_megabyte_prompts_do_not_stall_health(server):
    """8 clients at once send 1 MB prompts (from another process: 8 threads encoding megabytes would
    slow this process's own /health probe, not the server)."""
    def send_all():
        out = subprocess.run([sys.executable, "-c", SEND_EIGHT, server.url], capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout)

    with HealthProbe(server) as probe:
        resps = beside_well_formed(server, send_all)
    assert len(resps) == 8 and all(code == 400 and "leaves no room" in message for code, message in resps), resps
    assert probe.codes == {200} and probe.worst < 1.0, (probe.codes, probe.worst)


# ---------------------------------------------------------------------------- item 6: a total body deadline
@pytest.mark.parametrize("interval", [0.3, 0.05])
def test_a_trickling_body_gets_408_at_the_deadline(server, interval):
    def trickle():
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000\r\n\r\n")
            t0, data = time.monotonic(), b""
            s.settimeout(interval)
            while b"\r\n\r\n" not in data and time.monotonic() - t0 < 20:
                try:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                except socket.timeout:
                    s.sendall(b" ")      # one byte at a time, never the whole body
            return data, time.monotonic() - t0

    data, seconds = beside_well_formed(server, trickle)
    assert data.startswith(b"HTTP/1.1 408"), data
    assert b"--body-timeout" in data
    assert BODY_TIMEOUT_S <= seconds < BODY_TIMEOUT_S + 1.5, seconds


# ---------------------------------------------------------------------------- item 8: limits and defaults
def test_models_advertises_what_a_request_can_hold(server):
    card = httpx.get(server.url + "/v1/models").json()["data"][0]
    assert card["max_model_len"] == SERVED and card["context_length"] == CONTEXT and card["kv_cache_tokens"] == SERVED


def test_a_default_max_tokens_is_what_the_prompt_leaves(server):
    """Left out, max_tokens is the default (chat 1024, completions 16) or the room the prompt leaves in
    the 320 tokens a request can hold, whichever is less: the request runs instead of a 400 naming a
    max_tokens the client never sent."""
    prompt = "Once upon a time " * 18
    resp = beside_well_formed(server, lambda: post(server, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": prompt}], "chat_template": "{{ messages[0].content }}",
        "ignore_eos": True}))
    assert resp.status_code == 200, resp.text
    usage = resp.json()["usage"]
    assert 16 < SERVED - usage["prompt_tokens"] < 1024
    assert usage["completion_tokens"] == SERVED - usage["prompt_tokens"], usage   # min(1024, what is left)
    ids = [5] * (SERVED - 10)
    resp = beside_well_formed(server, lambda: post(server, "/v1/completions", {"prompt": ids, "ignore_eos": True}))
    assert resp.json()["usage"]["completion_tokens"] == 10, resp.text           # min(16, what is left)


def test_admission_errors_name_what_the_client_sent(server):
    err = assert_error(post(server, "/v1/completions", {"prompt": "Hi", "max_tokens": 400}), 400)
    assert "max_tokens (400)" in err["message"], err
    err = assert_error(post(server, "/v1/completions", {"prompt": "Hi " * 400}), 400)
    assert f"at most {SERVED} tokens" in err["message"] and "KV pool" in err["message"], err
    assert "max_tokens" not in err["message"]           # the client sent none: none is named
    wait_pools_free(server)


# ---------------------------------------------------------------------------- item 1 again: SIGTERM (last: it stops the server)
def test_sigterm_during_a_runaway_render_ends_the_server(server):
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        hostile = pool.submit(post, server, "/v1/chat/completions", {
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "chat_template": LOOP})
        time.sleep(0.3)
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(BUDGET_S + KILL_GRACE_S + 15) == 0
        assert time.monotonic() - t0 < BUDGET_S + KILL_GRACE_S + 10
        resp = hostile.result()
    assert resp.status_code == 400 and "time budget" in resp.json()["error"]["message"]


# ---------------------------------------------------------------------------- item 9: the queue
MAX_NUM_SEQS, MAX_QUEUE = 1, 2


@pytest.fixture(scope="module")
def queued(tiny_pair, tmp_path_factory):
    """A long context, so that a request can run for seconds: the others arrive while it runs."""
    pair = tiny_pair("llama", "llama", "bytelevel", 0.5, max_position_embeddings=4096)
    srv = ServerProcess(*pair, tmp_path_factory.mktemp("queue") / "server.log",
                        "--max-num-seqs", str(MAX_NUM_SEQS), "--max-queue", str(MAX_QUEUE), "--num-blocks", "256")
    yield srv
    srv.stop()


LONG = {"prompt": "Queue", "max_tokens": 200, "ignore_eos": True, "temperature": 0}   # ~1 s each here


def test_simultaneous_requests_are_served_up_to_running_plus_waiting(queued):
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        resps = list(pool.map(lambda i: post(queued, "/v1/completions", {**LONG, "prompt": f"Queue {i}"}), range(10)))
    codes = sorted(r.status_code for r in resps)
    assert codes == [200] * (MAX_NUM_SEQS + MAX_QUEUE) + [503] * (10 - MAX_NUM_SEQS - MAX_QUEUE), codes
    for r in resps:
        if r.status_code == 503:
            err = assert_error(r, 503)
            assert err["code"] == "server_overloaded" and "--max-queue 2" in err["message"], err
    wait_pools_free(queued)


def test_the_queue_limit_at_its_boundary(queued):
    """One running + exactly --max-queue waiting are accepted; one more is refused, while /metrics
    says the queue is full; once they end, requests are accepted again."""
    streams = []

    def open_stream(i: int):
        cm = httpx.stream("POST", queued.url + "/v1/completions", json={**LONG, "prompt": f"S{i}", "stream": True,
                                                                       "max_tokens": 3000}, timeout=60)
        resp = cm.__enter__()
        streams.append(cm)
        return resp

    try:
        first = open_stream(0)
        assert first.status_code == 200
        lines = first.iter_lines()                     # kept: a dropped iterator closes the stream
        next(lines)                                    # it runs
        assert [open_stream(i).status_code for i in (1, 2)] == [200, 200]   # waiting: exactly the limit
        m = metrics(queued)
        assert (m["nudge_requests_running"], m["nudge_requests_waiting"]) == (MAX_NUM_SEQS, MAX_QUEUE), m
        err = assert_error(post(queued, "/v1/completions", {"prompt": "one more", "max_tokens": 2}), 503)
        assert err["code"] == "server_overloaded"
    finally:
        for cm in streams:
            cm.__exit__(None, None, None)               # the clients leave: their requests are aborted
    wait_pools_free(queued)
    assert post(queued, "/v1/completions", {"prompt": "again", "max_tokens": 2}).status_code == 200
    wait_pools_free(queued)


# ---------------------------------------------------------------------------- item 7: a dead tensor-parallel worker
def _worker_pids(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the worker through /proc")
def test_a_worker_killed_while_idle_turns_health_503_with_the_reason(pair, tmp_path):
    srv = ServerProcess(*pair, tmp_path / "tp.log", "--tensor-parallel-size", "2",
                        "--num-blocks", "64", env={"OMP_NUM_THREADS": "1"})
    try:
        stream = beside_well_formed(srv, lambda: post(srv, "/v1/completions", {"prompt": "Hi", "max_tokens": 4}))
        assert stream.status_code == 200
        (worker,) = _worker_pids(srv.proc.pid)
        os.kill(worker, signal.SIGKILL)
        t0 = time.monotonic()
        while httpx.get(srv.url + "/health").status_code == 200:
            assert time.monotonic() - t0 < 5, "a dead worker went unnoticed for 5 s"
            time.sleep(0.1)
        health = httpx.get(srv.url + "/health")
        assert health.status_code == 503 and health.headers["retry-after"]
        reason = health.json()["reason"]
        assert "worker rank 1" in reason and "died" in reason and "restart" in reason, reason
        err = assert_error(post(srv, "/v1/completions", {"prompt": "Hi", "max_tokens": 4}), 503)
        assert err["code"] == "engine_dead" and "worker rank 1" in err["message"]
        assert "goes on serving" not in err["message"]
    finally:
        srv.stop()
    assert srv.proc.returncode == 0


assert WELL_FORMED["stream"]   # the well-formed request every case runs beside
