#!/usr/bin/env bash
# The package as a user gets it: build a wheel from the tree, install it (no editable install, no
# checkout on the path) in a fresh venv, and run the CLI from there: --help, a tiny same-tokenizer
# and cross-tokenizer generation, and `nudge serve` up to a 200 from /health.
#
# The fresh venv reuses the dependencies already installed for PY (default .venv/bin/python) through
# a .pth line, so nothing is downloaded; the wheel goes in with --no-deps, and `pip check`-style
# import of every submodule proves nothing is missing from it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
work=$(mktemp -d)
server_pid=""
cleanup() {
    if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

"$PY" -m pip wheel -q --no-build-isolation --no-deps -w "$work/dist" . 2>&1 | grep -v "^WARNING: Location" || true
wheel=$(ls "$work"/dist/nudge_engine-*.whl)
echo "wheel: $(basename "$wheel")"
"$PY" -m zipfile -l "$wheel" | awk '{print $1}' | grep -E '^nudge_engine/((engine|model|pairing|server)/__init__|kernels/handoff_step).py$' | sort

"$PY" -m venv "$work/venv"
venv_py="$work/venv/bin/python"
# PY's site-packages (torch, tokenizers, fastapi, ...) after the fresh venv's own: a .pth path line
# adds the folder but runs none of its .pth files, so an editable install there stays invisible.
own=$("$venv_py" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
"$PY" -c "import sys; print('\n'.join(p for p in sys.path if p.endswith(('site-packages', 'dist-packages'))))" \
    > "$own/zz_nudge_wheel_check_deps.pth"
"$venv_py" -m pip install -q --no-deps --no-index "$wheel" 2>&1 | grep -v "^WARNING: Location" || true

cd "$work"   # nothing from the checkout on sys.path from here on
"$venv_py" - <<'PY'
import importlib, sys
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path
import nudge_engine
assert nudge_engine.__file__.startswith(sys.prefix), f"imported from {nudge_engine.__file__}, not the wheel"
# Every module file of the installed package, namespace folders included (nudge_engine.kernels has
# no __init__.py on purpose, and pkgutil.walk_packages does not enter such folders).
root = Path(nudge_engine.__file__).parent
files = [f for f in root.rglob("*") if f.name.endswith((".py", *EXTENSION_SUFFIXES)) and f.name != "__main__.py"]
names = sorted(".".join(("nudge_engine", *f.relative_to(root).parent.parts, f.name.split(".")[0])).removesuffix(".__init__")
               for f in files)   # __main__ runs the CLI
for name in names:
    importlib.import_module(name)
needed = {"nudge_engine.pairing.text", "nudge_engine.pairing.text_sampling", "nudge_engine.pairing.text_logprobs", "nudge_engine.engine.engine", "nudge_engine.model.loader",
          "nudge_engine.server.app", "nudge_engine.kernels.handoff_step",
          "nudge_engine._core", "nudge_engine.testing.tokenizer_factory", "nudge_engine.distributed.launch",
          "nudge_engine.model.graph_runner", "nudge_engine.pairing.device_drafts", "nudge_engine.pairing.host_read",
          "nudge_engine.model.draft_graph", "nudge_engine.pairing.walk_logprobs"}
assert needed <= set(names), needed - set(names)
print(f"imported {len(names)} modules from {nudge_engine.__path__[0]}")
PY
nudge="$work/venv/bin/nudge"
"$nudge" --help > /dev/null
"$nudge" make-tiny "$work/tiny" > /dev/null
"$nudge" make-tiny "$work/tiny_meta" --tokenizer metaspace > /dev/null
"$nudge" generate --base "$work/tiny/base" --nudger "$work/tiny/nudger" --prompt "Hello there" --max-tokens 8 --color never
"$nudge" generate --base "$work/tiny/base" --nudger "$work/tiny_meta/nudger" --prompt "Hello there" --max-tokens 8 --color never

port=$("$venv_py" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
"$nudge" serve --base "$work/tiny/base" --nudger "$work/tiny/nudger" --port "$port" > "$work/serve.log" 2>&1 &
server_pid=$!
"$venv_py" - "$port" <<'PY' || { cat "$work/serve.log"; exit 1; }
import json, sys, time, urllib.request
port = sys.argv[1]
for _ in range(120):
    try:
        if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
            break
    except OSError:
        time.sleep(0.5)
else:
    sys.exit("nudge serve never answered /health")
body = json.dumps({"prompt": "Hello", "max_tokens": 4, "temperature": 0}).encode()
req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body, {"Content-Type": "application/json"})
out = json.load(urllib.request.urlopen(req, timeout=60))
assert out["choices"][0]["finish_reason"] in ("stop", "length"), out
print("serve: /health 200, one completion:", repr(out["choices"][0]["text"]))
PY
kill "$server_pid"; wait "$server_pid" 2>/dev/null || true; server_pid=""
echo "wheel check passed"
