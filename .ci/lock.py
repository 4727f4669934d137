"""Writes constraints.txt: the exact version of every distribution the project and its test and bench
extras need, as installed in the running interpreter's environment (the one the suite just passed in).

    python .ci/lock.py [--check]      # --check: exit 1 if constraints.txt differs from what it would write

`make lock` is the documented way to update the lock: it builds a fresh venv with the newest releases,
runs the suite there, and calls this script only when the suite passed. torch and triton are left out
on purpose (a GPU machine keeps its own; `make setup` installs the CPU pair of constraints-torch.txt only
where no torch is importable), and so is pip's own tooling.
"""
from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "nudge_engine"
EXTRAS = ("test", "bench")
BUILD = ("pybind11",)   # the C++ core's build requirement (`make setup` installs it beside the package)
UNLOCKED = {"torch", "triton", "pip", "setuptools", "wheel"}   # torch's pair: constraints-torch.txt
UNLOCKED_PREFIXES = ("nvidia-", "cuda-")                        # torch's own CUDA wheels
HEADER = """# The versions `make test` last passed with. `make setup` installs with `-c constraints.txt`.
# Update: `make lock` (fresh venv with the newest releases, the suite, then this file; see README).
# Written by .ci/lock.py; torch and triton are in constraints-torch.txt (used only where no torch is
# importable, so a GPU machine keeps its own).
"""


def closure() -> dict[str, str]:
    """name -> version of every distribution reachable from the project's requirements."""
    seen: dict[str, str] = {}
    walked: set[tuple[str, tuple[str, ...]]] = set()
    todo = [(PROJECT, EXTRAS)] + [(name, ()) for name in BUILD]
    while todo:
        name, extras = todo.pop()
        if (canonicalize_name(name), extras) in walked:
            continue
        walked.add((canonicalize_name(name), extras))
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"{name} is not installed: run `make setup` first") from None
        seen[canonicalize_name(dist.metadata["Name"])] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            envs = [{"extra": e} for e in ("", *extras)]
            if req.marker is None or any(req.marker.evaluate(env) for env in envs):
                todo.append((req.name, tuple(sorted(req.extras))))
    seen.pop(canonicalize_name(PROJECT), None)
    return {n: v for n, v in seen.items() if n not in UNLOCKED and not n.startswith(UNLOCKED_PREFIXES)}


def render() -> str:
    return HEADER + "".join(f"{n}=={v}\n" for n, v in sorted(closure().items()))


def main() -> int:
    target = ROOT / "constraints.txt"
    text = render()
    if "--check" in sys.argv:
        same = target.is_file() and target.read_text() == text
        print("constraints.txt is up to date" if same else "constraints.txt differs from this environment")
        return 0 if same else 1
    target.write_text(text)
    print(f"wrote {target} ({text.count(chr(10)) - HEADER.count(chr(10))} pins)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
