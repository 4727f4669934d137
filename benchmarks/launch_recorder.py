"""Records every distinct Triton kernel specialization this process launches, for the compile gate.

A hook on the two launch paths every `kernel[grid](...)` call goes through (JITFunction.run on a
GPU, InterpretedFunction.run under TRITON_INTERPRET=1) writes down what picks the compiled
binary: the kernel (module + qualified name), each argument's type and the properties Triton
specializes on, the constexpr values and the launch options (num_warps, num_stages, ...). No
kernel list is kept by hand: a new kernel joins the gate when a test or launcher launches it.

With execute=False a launch is recorded and skipped, so launchers can be driven at production
shapes on a machine with neither a GPU nor the time to interpret them (compile_gate_shapes.py).

Use it from pytest with `-p benchmarks.launch_recorder` and NUDGE_RECORD_LAUNCHES=<file.jsonl>.
"""
from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

RECORD_ENV = "NUDGE_RECORD_LAUNCHES"
_I32_MIN, _I32_MAX = -(2**31), 2**31 - 1
_ALIGN = 16  # the pointer / integer divisibility Triton specializes on


def canonical_int(v: int) -> int:
    """A stand-in with the same Triton specialization as v (value 1, divisibility by 16, width),
    so launches that differ only in sizes collapse into one record."""
    if v == 1:
        return 1
    wide = not (_I32_MIN <= v <= _I32_MAX)
    if v % _ALIGN == 0:
        return 2**36 if wide else 16
    return 2**36 + 1 if wide else 3


def _is_constexpr(param: inspect.Parameter) -> bool:
    ann = param.annotation
    return ann is not inspect.Parameter.empty and "constexpr" in (ann if isinstance(ann, str) else repr(ann))


def encode_arg(value, constexpr: bool):
    """JSON form of one kernel argument: exact for constexprs, specialization-preserving otherwise."""
    if hasattr(value, "data_ptr") and hasattr(value, "dtype"):
        return {"tensor": str(value.dtype), "align": value.data_ptr() % _ALIGN}
    if value is None or isinstance(value, str):
        return {"value": value}
    if isinstance(value, bool):
        return {"value": value}
    if isinstance(value, int):
        return {"value": value if constexpr else canonical_int(value)}
    if isinstance(value, float):
        return {"value": value if constexpr else 0.5}
    if hasattr(value, "value"):  # a tl.constexpr object
        return encode_arg(value.value, True)
    return {"unsupported": repr(value)[:80]}


class LaunchRecorder:
    """Install once; every launch afterwards lands in `records` (one entry per specialization)."""

    def __init__(self, execute: bool = True, tag: str = "tests", target: str | None = None):
        self.execute = execute
        self.tag = tag          # where the launches come from: "tests", "production", ...
        self.target = target    # "sm80" / "sm90" when the launch shape was planned for one GPU
        self.records: dict[str, dict] = {}
        self._saved = []

    def record(self, fn, args, kwargs, do_not_specialize=()) -> None:
        sig = inspect.signature(fn)
        params = list(sig.parameters.values())
        names = {p.name for p in params}
        options = {k: v for k, v in kwargs.items() if k not in names}
        bound = sig.bind_partial(*args, **{k: v for k, v in kwargs.items() if k in names})
        bound.apply_defaults()
        enc = []
        for i, p in enumerate(params):
            value = bound.arguments[p.name]
            if (i in do_not_specialize or p.name in do_not_specialize) and isinstance(value, int):
                value = 3  # Triton compiles one binary for every value: so does the gate
            enc.append(encode_arg(value, _is_constexpr(p)))
        rec = {
            "module": fn.__module__, "name": fn.__qualname__, "file": inspect.getsourcefile(fn),
            "args": enc, "options": {k: encode_arg(v, True)["value"] for k, v in sorted(options.items())},
            "target": self.target,
        }
        key = json.dumps(rec, sort_keys=True)
        entry = self.records.setdefault(key, dict(rec, tags=[], launches=0))
        entry["launches"] += 1
        if self.tag not in entry["tags"]:
            entry["tags"].append(self.tag)

    def install(self) -> "LaunchRecorder":
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction

        recorder = self
        for cls in (JITFunction, InterpretedFunction):
            original = cls.run

            def run(kernel, *args, grid, warmup, _original=original, **kwargs):
                if not warmup:
                    dns = getattr(kernel, "do_not_specialize", None)
                    if dns is None:  # InterpretedFunction keeps the jit() arguments
                        dns = getattr(kernel, "kwargs", {}).get("do_not_specialize") or ()
                    recorder.record(kernel.fn, args, kwargs, tuple(dns))
                    if not recorder.execute:
                        return None
                return _original(kernel, *args, grid=grid, warmup=warmup, **kwargs)

            self._saved.append((cls, original))
            cls.run = run
        return self

    def uninstall(self) -> None:
        for cls, original in reversed(self._saved):
            cls.run = original
        self._saved.clear()

    def __enter__(self):
        return self.install()

    def __exit__(self, *exc):
        self.uninstall()

    def save(self, path: str | os.PathLike) -> None:
        """Append this process's records (one JSON object a line); load() merges duplicates."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            for entry in self.records.values():
                f.write(json.dumps(entry, sort_keys=True) + "\n")


def load(path: str | os.PathLike) -> list[dict]:
    """Records of a .jsonl file, duplicates (same kernel, arguments, options, target) merged."""
    merged: dict[str, dict] = {}
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        entry = json.loads(line)
        key = json.dumps({k: entry[k] for k in ("module", "name", "file", "args", "options", "target")},
                         sort_keys=True)
        if key in merged:
            merged[key]["launches"] += entry["launches"]
            merged[key]["tags"] = sorted(set(merged[key]["tags"]) | set(entry["tags"]))
        else:
            merged[key] = entry
    return list(merged.values())


# ---- pytest plugin: `pytest -p benchmarks.launch_recorder` with NUDGE_RECORD_LAUNCHES set ----------
_session_recorder: LaunchRecorder | None = None


def pytest_configure(config):
    global _session_recorder
    if os.environ.get(RECORD_ENV) and _session_recorder is None:
        try:
            _session_recorder = LaunchRecorder(execute=True, tag="tests").install()
        except ImportError:  # no triton: nothing can be launched, nothing to record
            _session_recorder = None


def pytest_unconfigure(config):
    global _session_recorder
    if _session_recorder is not None:
        _session_recorder.uninstall()
        _session_recorder.save(os.environ[RECORD_ENV])
        _session_recorder = None
