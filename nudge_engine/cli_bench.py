"""`nudge bench [NAME [ARGS...]]`: lists or runs a script from benchmarks/ (part of the `nudge` CLI, cli.py).

Imports nothing heavy: the benchmark runs in its own process.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

THREADS_ENV = "NUDGE_THREADS"   # `nudge bench --threads N`: the torch threads a benchmark's CPU runs use


def _benchmark_dirs() -> list[Path]:
    dirs = [Path.cwd() / "benchmarks", Path(__file__).resolve().parents[1] / "benchmarks"]
    seen, out = set(), []
    for d in dirs:
        if d.is_dir() and d.resolve() not in seen:
            seen.add(d.resolve())
            out.append(d)
    return out


def _benchmarks(folder: Path) -> dict[str, Path]:
    """Runnable scripts: shell scripts, and Python files with a `__main__` block (not helper modules)."""
    out = {}
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.name.startswith("_") or p.suffix not in (".py", ".sh"):
            continue
        if p.suffix == ".py" and "__main__" not in p.read_text(errors="replace"):
            continue
        out[p.stem] = p
    return out


def cmd_bench(args) -> int:
    dirs = _benchmark_dirs()
    if not dirs or not any(_benchmarks(d) for d in dirs):
        print("nudge bench: no benchmarks/ folder with scripts here (run it from the repository root); "
              "nothing to run.", file=sys.stderr)
        return 2
    folder = next(d for d in dirs if _benchmarks(d))
    scripts = _benchmarks(folder)
    if not args.name:
        print(f"benchmarks in {folder}:")
        for name, path in scripts.items():
            print(f"  {name:24s} {path.name}")
        print("run one with: nudge bench NAME [ARGS...]  (ARGS go to the script; try NAME --help)")
        return 0
    name = Path(args.name).stem
    path = scripts.get(name) or scripts.get(f"bench_{name}")
    if path is None:
        print(f"nudge bench: no benchmark {args.name!r} in {folder} (have: {', '.join(scripts)})", file=sys.stderr)
        return 2
    root = folder.parent
    if path.suffix == ".sh":
        cmd = ["bash", str(path), *args.args]
    elif (folder / "__init__.py").is_file():
        cmd = [sys.executable, "-m", f"{folder.name}.{path.stem}", *args.args]
    else:
        cmd = [sys.executable, str(path), *args.args]
    env = dict(os.environ)
    if getattr(args, "threads", None):   # benchmarks/hardware.py setup_device reads it; torch's default too
        env[THREADS_ENV] = env["OMP_NUM_THREADS"] = str(args.threads)
    print("+ " + " ".join(cmd), file=sys.stderr)
    return subprocess.call(cmd, cwd=root, env=env)


# ---------------------------------------------------------------------------- parser
