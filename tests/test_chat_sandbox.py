"""Chat templates on a budget (issue 28, item 1): a hostile template fails its own render, in its
renderer process, within the budget, with an error naming it; renders beside it go on, the caller's
process is never frozen (not even its other threads), and a template that cannot serve any chat is
found once at load."""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from nudge_engine.model import chat_sandbox
from nudge_engine.model.chat_sandbox import TemplateBudgetError, TemplateError
from nudge_engine.model.tokenizer import Tokenizer

BUDGET_S = 1.0
MESSAGES = [{"role": "user", "content": "hi"}]
GOOD = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<a>{% endif %}"
LOOP = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
HOSTILE = {   # template -> what the error says
    "nested_range": (LOOP, "time budget"),
    "string_times_1e7": ("{{ 'x'*10000000 }}", "output limit"),
    "list_times_1e9": ("{{ (range(10)|list) * 1000000000 }}", "output limit"),
    "power_tower": ("{{ 7 ** 1000000 }}", "bits"),
    "center_1e10": ("{{ 'x'|center(10000000000) }}", "memory budget"),
    "doubling": ("{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}"
                 "{{ ns.s }}", "budget"),
    "output_stream": ("{% for i in range(100000) %}{{ 'y' * 1000 }}{% endfor %}", "output passed the limit"),
    "recursion": ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "recursed too deep"),
}


@pytest.fixture(autouse=True)
def budget():
    previous = chat_sandbox.time_budget()
    chat_sandbox.set_time_budget(BUDGET_S)
    yield
    chat_sandbox.set_time_budget(previous)


def render(template: str, messages=MESSAGES, name="the chat template of test") -> str:
    return chat_sandbox.render(template, {"messages": messages, "add_generation_prompt": True}, name)


def test_a_well_formed_template_renders_as_jinja_does():
    assert render(GOOD) == "<user>hi<a>"
    assert render(GOOD, [{"role": "user", "content": "x" * 100_000}]).endswith("x<a>")  # long input, long output


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_template_fails_alone_within_its_budget(case):
    template, says = HOSTILE[case]
    with _ticker() as gaps:                 # a thread of this process keeps running all along
        results = {}

        def good():
            t0 = time.monotonic()
            results["good"] = [render(GOOD) for _ in range(20)]
            results["good_s"] = time.monotonic() - t0

        beside = threading.Thread(target=good)
        t0 = time.monotonic()
        beside.start()
        with pytest.raises(TemplateBudgetError) as info:
            render(template)
        elapsed = time.monotonic() - t0
        beside.join()
    assert says in str(info.value) and "the chat template of test" in str(info.value)
    assert elapsed < BUDGET_S + chat_sandbox.KILL_GRACE_S + 1, elapsed
    assert results["good"] == ["<user>hi<a>"] * 20
    assert max(gaps, default=0) < 0.5, max(gaps)      # the GIL was never held by the template
    assert render(GOOD) == "<user>hi<a>"   # the renderers serve on


def test_a_renderer_that_never_answers_is_killed_and_replaced():
    """A C call that never returns ignores the renderer's own alarm: the caller kills it at the budget
    plus the grace, and the next render gets a fresh process."""
    pool = chat_sandbox.pool()
    render(GOOD)
    with pool._cond:
        renderers = list(pool._idle)
    for r in renderers:
        os.kill(r.proc.pid, signal.SIGSTOP)        # stands in for a C call that holds the renderer forever
    t0 = time.monotonic()
    with pytest.raises(TemplateBudgetError, match="ran past its time budget"):
        render(GOOD)
    assert time.monotonic() - t0 < BUDGET_S + chat_sandbox.KILL_GRACE_S + 1
    killed = [r for r in renderers if r.proc.poll() is not None]
    assert len(killed) == 1 and killed[0].proc.returncode == -signal.SIGKILL
    for r in renderers:
        if r.proc.poll() is None:
            os.kill(r.proc.pid, signal.SIGCONT)
    assert [render(GOOD) for _ in range(4)] == ["<user>hi<a>"] * 4
    with pool._cond:
        assert killed[0] not in pool._idle


def test_errors_of_the_template_itself_are_template_errors_naming_it():
    cases = {"{% for %}": "does not compile", "{{ raise_exception('no system role') }}": "no system role",
             "{{ 1 / 0 }}": "ZeroDivisionError", "{{ ''.__class__.__mro__[1].__subclasses__() }}": "unsafe",
             "{{ '\\ud800' }}": "not valid Unicode"}
    tok_name = "the chat template of test"
    for template, says in cases.items():
        with pytest.raises(TemplateError) as info:
            from nudge_engine.model.tokenizer import _valid_text
            _valid_text(render(template), tok_name)
        assert says in str(info.value) and tok_name in str(info.value) and not isinstance(info.value, TemplateBudgetError)


def test_the_check_at_load_refuses_what_can_never_serve_a_chat():
    ctx = {"messages": chat_sandbox.TRIAL_MESSAGES, "add_generation_prompt": True}
    assert chat_sandbox.check(GOOD, ctx, "t") is None
    assert "time budget" in chat_sandbox.check(LOOP, ctx, "t")
    assert "output limit" in chat_sandbox.check("{{ 'x'*10000000 }}", ctx, "t")
    assert "does not compile" in chat_sandbox.check("{% if %}", ctx, "t")
    # An error that may depend on the messages (a template that wants a system message) is only logged.
    assert chat_sandbox.check("{{ raise_exception('need a system message') }}", ctx, "t") is None


def test_a_model_whose_template_runs_away_refuses_chat_at_once(tiny_model, tmp_path):
    folder = tiny_model("llama")
    copy = tmp_path / "model"
    copy.mkdir()
    for f in folder.iterdir():
        (copy / f.name).symlink_to(f)
    (copy / "tokenizer_config.json").unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (copy / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": LOOP}))
    t0 = time.monotonic()
    tok = Tokenizer(copy)
    assert time.monotonic() - t0 < BUDGET_S + chat_sandbox.KILL_GRACE_S + 5
    assert str(copy) in tok.chat_template_error and "time budget" in tok.chat_template_error
    t0 = time.monotonic()
    with pytest.raises(TemplateError, match="trial render at load"):
        tok.render_chat(MESSAGES)
    assert time.monotonic() - t0 < 0.1       # refused at once: the budget is not spent again
    assert tok.render_chat(MESSAGES, template=GOOD) == "<user>hi<a>"   # a request's own template still renders
    assert Tokenizer(folder).chat_template_error is None


class _ticker:
    """Records the gaps between a background thread's 10 ms sleeps while the block runs."""

    def __enter__(self):
        self.gaps, self.stop = [], threading.Event()

        def run():
            last = time.monotonic()
            while not self.stop.wait(0.01):
                now = time.monotonic()
                self.gaps.append(now - last)
                last = now

        self.thread = threading.Thread(target=run)
        self.thread.start()
        return self.gaps

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def test_the_async_engine_renders_away_from_its_loop_and_engine_thread(tiny_pair, check_pools):
    """AsyncNudgeEngine (what embedders use) renders a chat on a worker thread: while a runaway request
    template spends its budget, another request runs to its end and the event loop keeps ticking."""
    import asyncio

    from nudge_engine import AsyncNudgeEngine, NudgeEngine, SamplingParams
    from nudge_engine.engine.async_errors import InvalidRequestError
    engine = NudgeEngine(*tiny_pair("llama", "llama", "bytelevel", 0.5))
    check_pools(engine)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)

    async def main():
        front = AsyncNudgeEngine(engine)
        try:
            hostile = asyncio.ensure_future(front.generate({"messages": MESSAGES, "chat_template": LOOP}, params))
            await asyncio.sleep(0.1)
            t0 = time.monotonic()
            out = await front.generate("Hi", params)
            well_formed_s = time.monotonic() - t0
            ticks, t1 = 0, time.monotonic()
            while not hostile.done():
                await asyncio.sleep(0.01)
                ticks += 1
            with pytest.raises(InvalidRequestError, match="time budget"):
                await hostile
            return out, well_formed_s, ticks / (time.monotonic() - t1 + 1e-9)
        finally:
            front.shutdown()

    out, well_formed_s, tick_rate = asyncio.run(main())
    assert out.finish_reason == "length" and len(out.token_ids) == 8
    assert well_formed_s < BUDGET_S * 0.8, well_formed_s
    assert tick_rate > 20, tick_rate
