"""Chat templates rendered where a hostile one costs only its own request: a separate process, on a budget.

A chat template comes from a model file (or, when the operator allows it, from a request), and it is
a program. jinja2's sandbox keeps it away from Python's internals, not from looping for hours
(`{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}`), from building
gigabytes of text (`{{ 'x' * 10000000000 }}`), or from burning CPU inside one C call that holds the
GIL (`{{ 10 ** 10 ** 9 }}`). A thread running such a template can be neither stopped nor kept from
freezing the whole server, SIGTERM included. So templates render in a renderer process (this file is
its program: standard library and jinja2 only), under a budget:

- time: the renderer interrupts itself after `time_s` (SIGALRM); the caller kills it (SIGKILL) at
  `time_s + KILL_GRACE_S` if it has not answered (a C call that never returns) and starts another
  on the next render; a CPU-time limit ends a renderer whose caller is gone;
- output: `*` and `**` are refused before they run when their result would pass the output limit
  (the sandbox's binary-operator hook), and the output is counted as it streams (`generate()`);
- memory: the renderer's address space is capped (RLIMIT_AS): `'x'|center(10**10)` is a
  MemoryError in there, never the server's.

A template that breaks its budget fails that one render with a TemplateBudgetError naming the
template; the caller's thread waits at most the budget, and nothing else waits at all (the server
renders from a worker thread: never on the event loop, never on the engine thread). `check()` tries
a model's template once at load on a one-message chat: a syntax error or a broken budget there
disables that model's chat (tokenizer.py refuses its chat requests at once with the reason).

Where no renderer process can start (a frozen application, a failed start), templates render in the
caller's process with the same output limits but no time limit, and the log says so once.
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__" and sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]   # run by path: this folder's modules (tokenizer.py, ...) must not shadow the standard library

import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import select  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

log = logging.getLogger("nudge_engine.chat_sandbox")

DEFAULT_TIME_S = 5.0              # one render: far above any real template (milliseconds), far below a hung client
KILL_GRACE_S = 2.0                # after the budget: the renderer's own alarm had this long to answer
STARTUP_TIMEOUT_S = 60.0          # a renderer process to start and import jinja2 (a loaded machine)
MIN_OUTPUT_CHARS = 1 << 20        # output limit: this much, plus
OUTPUT_PER_INPUT_CHAR = 8         # this many characters per character of the template's input
MEMORY_LIMIT_BYTES = 1 << 30      # the renderer's address space
MAX_INT_BITS = 1 << 16            # `**` on integers: results up to this many bits
RENDERERS = 2                     # processes at most; more renders at once wait for one
COMPILED_CACHE = 16               # compiled templates kept per renderer
TRIAL_MESSAGES = [{"role": "user", "content": "Hello"}]

_settings = {"time_s": DEFAULT_TIME_S}


class TemplateError(ValueError):
    """The template failed to render: its own error (raise_exception, undefined, a syntax error: kind
    "syntax"), an unsafe access, or a broken budget (TemplateBudgetError)."""

    def __init__(self, message: str, kind: str = "template"):
        super().__init__(message)
        self.kind = kind


class TemplateBudgetError(TemplateError):
    """The template ran past its budget of time, output or memory and was stopped."""

    def __init__(self, message: str):
        super().__init__(message, "budget")


def set_time_budget(seconds: float) -> None:
    """The time one render may take, for every render of this process from now on (`--chat-template-timeout`)."""
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"the chat template time budget must be a positive number of seconds, got {seconds}")
    _settings["time_s"] = float(seconds)


def time_budget() -> float:
    return _settings["time_s"]


def output_limit(context: dict) -> int:
    return MIN_OUTPUT_CHARS + OUTPUT_PER_INPUT_CHAR * len(json.dumps(context, ensure_ascii=False))


# ---------------------------------------------------------------------------- the sandbox (any process)
class _Stop(BaseException):
    """Raised inside a render to end it: a BaseException, so no template-level handler swallows it."""


def _raise_exception(message: str) -> None:
    raise TemplateError(f"it raised an error: {message}")


_environment_made: list = []
_render_limit = threading.local()     # .max_output of the render running on this thread


def _environment():
    """jinja2's immutable sandbox, with `*` and `**` checked before they run (one per process)."""
    if _environment_made:
        return _environment_made[0]
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BudgetedSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context, operator, left, right):
            max_output = _render_limit.max_output
            if operator == "*":
                for seq, times in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(times, int) and len(seq) * times > max_output:
                        raise TemplateBudgetError(f"`*` would make {len(seq) * times} items, more than the "
                                                  f"output limit of {max_output}")
            elif (isinstance(left, int) and isinstance(right, int) and abs(left) > 1
                  and (right > MAX_INT_BITS or right * math.log2(abs(left)) > MAX_INT_BITS)):
                raise TemplateBudgetError(f"`**` would make a number of more than {MAX_INT_BITS} bits")
            return super().call_binop(context, operator, left, right)

    env = BudgetedSandbox(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_exception
    _environment_made.append(env)
    return env


_compiled: dict[str, Any] = {}     # template source -> compiled (the last COMPILED_CACHE)


def render_here(template: str, context: dict, max_output: int) -> str:
    """Renders in this process: the sandbox and the output limit, no time limit (the renderer adds it).
    Raises TemplateError."""
    import jinja2
    env = _environment()
    _render_limit.max_output = max_output
    try:
        compiled = _compiled.get(template)
        if compiled is None:
            compiled = env.from_string(template)
            if len(_compiled) >= COMPILED_CACHE:
                _compiled.pop(next(iter(_compiled)), None)
            _compiled[template] = compiled
        out, size = [], 0
        for chunk in compiled.generate(**context):
            size += len(chunk)
            if size > max_output:
                raise TemplateBudgetError(f"its output passed the limit of {max_output} characters")
            out.append(chunk)
        return "".join(out)
    except TemplateError:
        raise
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"it does not compile: {e} (line {e.lineno})", "syntax") from None
    except jinja2.TemplateError as e:
        raise TemplateError(f"it failed to render: {e}") from None
    except MemoryError:
        raise TemplateBudgetError("it ran out of its memory budget") from None
    except RecursionError:
        raise TemplateBudgetError("it recursed too deep") from None
    except Exception as e:  # noqa: BLE001 - whatever the template's own code raised
        raise TemplateError(f"it failed to render: {type(e).__name__}: {e}") from None


# ---------------------------------------------------------------------------- the renderer process
def _serve(memory_limit: int) -> None:
    """The renderer's loop: one JSON request per line on stdin, one JSON reply per line on stdout."""
    import resource

    def stop(signum, frame):
        raise _Stop()

    resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))
    signal.signal(signal.SIGALRM, stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the server's to handle; stdin EOF ends us
    _, cpu_hard = resource.getrlimit(resource.RLIMIT_CPU)
    out = sys.stdout
    out.write('{"ready": true}\n')
    out.flush()
    for line in sys.stdin:
        request = json.loads(line)
        time_s = float(request["time_s"])
        used = sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
        cpu_cap = math.ceil(used + time_s + 2 * KILL_GRACE_S)   # SIGXCPU ends us even if the caller is gone
        if cpu_hard == resource.RLIM_INFINITY or cpu_cap <= cpu_hard:
            resource.setrlimit(resource.RLIMIT_CPU, (cpu_cap, cpu_hard))
        try:
            try:
                signal.setitimer(signal.ITIMER_REAL, time_s)
                reply = {"text": render_here(request["template"], request["context"], int(request["max_output"]))}
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except _Stop:
            reply = {"error": f"it ran past its time budget ({time_s:g} s)", "kind": "budget"}
        except TemplateError as e:
            reply = {"error": str(e), "kind": e.kind}
        except MemoryError:
            reply = {"error": "it ran out of its memory budget", "kind": "budget"}
        out.write(json.dumps(reply) + "\n")   # ASCII: a lone surrogate in the text travels escaped
        out.flush()


class _Renderer:
    """One renderer process, used by one caller at a time."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), str(MEMORY_LIMIT_BYTES)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True)
        try:
            if self._read_line(STARTUP_TIMEOUT_S) != {"ready": True}:
                raise OSError("the chat template renderer did not start")
        except BaseException:
            self.kill()
            raise

    def _read_line(self, timeout: float) -> dict | None:
        """The next reply, or None on time-out; OSError if the process is gone."""
        ready, _, _ = select.select([self.proc.stdout], [], [], max(timeout, 0))
        if not ready:
            return None
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise OSError(f"the chat template renderer ended (exit code {code})")
        return json.loads(line)

    def render(self, template: str, context: dict, max_output: int, time_s: float, name: str) -> str:
        """Raises TemplateError, or OSError when the process died (it is then dead: kill() was called)."""
        request = {"template": template, "context": context, "max_output": max_output, "time_s": time_s}
        try:
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            self.proc.stdin.flush()
            reply = self._read_line(time_s + KILL_GRACE_S)
        except (OSError, ValueError):
            self.kill()
            raise TemplateBudgetError(f"{name} could not be rendered: its renderer process died (out of its "
                                      "memory or CPU budget)") from None
        if reply is None:
            self.kill()
            raise TemplateBudgetError(f"{name} ran past its time budget ({time_s:g} s) and was stopped")
        if "error" in reply:
            kind = reply.get("kind", "template")
            if kind == "budget":
                raise TemplateBudgetError(f"{name} was stopped: {reply['error']}")
            raise TemplateError(f"{name}: {reply['error']}", kind)
        return reply["text"]

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass


class RendererPool:
    """Up to `size` renderer processes, started on demand; a caller takes an idle one or waits."""

    def __init__(self, size: int = RENDERERS):
        self.size = size
        self._idle: list[_Renderer] = []
        self._live = 0
        self._cond = threading.Condition()
        self._in_process = getattr(sys, "frozen", False)   # a frozen app cannot run this file as a program
        self._closed = False

    def render(self, template: str, context: dict, name: str, time_s: float | None = None) -> str:
        time_s = time_budget() if time_s is None else time_s
        max_output = output_limit(context)
        renderer = None if self._in_process else self._acquire()
        if renderer is None:
            return self._render_here(template, context, max_output, name)
        ok = False
        try:
            text = renderer.render(template, context, max_output, time_s, name)
            ok = True
            return text
        except TemplateError as e:
            ok = e.kind != "budget" or renderer.alive
            raise
        finally:
            self._release(renderer, ok and renderer.alive)

    def _render_here(self, template: str, context: dict, max_output: int, name: str) -> str:
        try:
            return render_here(template, context, max_output)
        except TemplateBudgetError as e:
            raise TemplateBudgetError(f"{name} was stopped: {e}") from None
        except TemplateError as e:
            raise TemplateError(f"{name}: {e}", e.kind) from None

    def _acquire(self) -> _Renderer | None:
        """An idle renderer, a new one, or None when none can start (then render in this process)."""
        with self._cond:
            while True:
                if self._in_process:
                    return None
                renderer = self._idle_renderer()
                if renderer is not None:
                    return renderer
                if self._live < self.size:
                    break
                self._cond.wait()
            self._live += 1
        try:
            return _Renderer()
        except (OSError, ValueError) as e:
            log.error("chat templates render in this process, with no time budget: no renderer process could "
                      "start (%s)", e)
            with self._cond:
                self._live -= 1
                self._in_process = True
                self._cond.notify_all()
            return None

    def _idle_renderer(self) -> _Renderer | None:
        """Under the lock: an idle renderer that is still running (one killed from outside is dropped)."""
        while self._idle:
            renderer = self._idle.pop()
            if renderer.alive:
                return renderer
            self._live -= 1
            renderer.kill()
        return None

    def _release(self, renderer: _Renderer, keep: bool) -> None:
        with self._cond:
            if keep and not self._closed:
                self._idle.append(renderer)
            else:
                self._live -= 1
            self._cond.notify()
        if not keep or self._closed:
            renderer.kill()

    def close(self) -> None:
        """Ends the idle renderers (busy ones end when their render returns)."""
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._live -= len(idle)
        for renderer in idle:
            renderer.kill()


_pool: RendererPool | None = None
_pool_lock = threading.Lock()


def pool() -> RendererPool:
    """This process's renderers (started on first use, ended at exit)."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool._closed:
            import atexit
            _pool = RendererPool()
            atexit.register(_pool.close)
        return _pool


def render(template: str, context: dict, name: str, time_s: float | None = None) -> str:
    """The template rendered on `context`, in a renderer process on a budget. `name` says in errors which
    template it is ("the chat template of /models/x.gguf"). Raises TemplateError (TemplateBudgetError)."""
    return pool().render(template, context, name, time_s)


def check(template: str, context: dict, name: str) -> str | None:
    """Why this template can never serve a chat, from a trial render on `context` (one short message),
    or None. Failures that may depend on the messages (raise_exception, a missing key) are only logged."""
    t0 = time.monotonic()
    try:
        render(template, context, name)
    except TemplateError as e:
        if e.kind in ("budget", "syntax"):
            return f"{e} (in a trial render at load: this model's chat requests are refused; send completion prompts)"
        log.warning("%s fails on a one-message trial chat at load: %s", name, e)
    else:
        log.debug("%s: trial render in %.1f ms", name, (time.monotonic() - t0) * 1e3)
    return None


if __name__ == "__main__":
    _serve(int(sys.argv[1]) if len(sys.argv) > 1 else MEMORY_LIMIT_BYTES)
