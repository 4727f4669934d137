#!/usr/bin/env bash
# Upstream drift: the model and reference tests against the NEWEST transformers, tokenizers,
# safetensors and gguf, in a fresh venv (no system site-packages), so that the next breaking upstream
# release fails CI here instead of in a user's hands. The locked environment (`make test`) stays the
# reproducible one; this run is the early warning. torch is the locked CPU pair (constraints-torch.txt)
# or, on a machine with its own torch, that torch's version.
#
#   bash .ci/upstream.sh            # prints the upstream versions it tested, then pytest's tail
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
UPSTREAM="transformers tokenizers safetensors gguf"
TESTS="tests/test_models.py tests/test_gguf.py tests/test_real_model.py tests/test_cross_tokenizer.py
       tests/test_nudging.py tests/test_factory.py tests/test_loader_errors.py tests/test_prompts.py"
PYTHON=${PYTHON:-python3}

work=$(mktemp -d -t nudge-upstream-XXXXXX)
trap 'rm -rf "$work"' EXIT
"$PYTHON" -m venv "$work/venv"
py="$work/venv/bin/python"
pin="$work/torch-pin.txt"
# The machine's own torch where one is importable (a GPU box); else the locked CPU pair.
if "$PYTHON" -c "import torch" 2>/dev/null; then
    "$PYTHON" -m pip freeze 2>/dev/null | grep -E '^(torch|triton)==' > "$pin" || true
else
    grep -E '^(torch|triton)==' constraints-torch.txt > "$pin"
fi
quiet() { grep -v "^WARNING: Location" || true; }   # this machine's pip config names absent mirrors
"$py" -m pip install -q -U pip setuptools wheel pybind11 2>&1 | quiet
"$py" -m pip install -q -r "$pin" 2>&1 | quiet
# The package itself (not editable: the checkout is left as it is), with its runtime requirements at
# their newest, then the tests' needs; -c keeps torch where it is.
"$py" -m pip install -q --no-build-isolation -c "$pin" "$ROOT" 2>&1 | quiet
"$py" -m pip install -q -U -c "$pin" $UPSTREAM pytest accelerate scipy httpx openai 2>&1 | quiet
(cd "$work" && "$py" -c "
import sys, importlib.metadata as m, nudge_engine
assert nudge_engine.__file__.startswith(sys.prefix), nudge_engine.__file__
print('upstream:', ', '.join(f'{n} {m.version(n)}' for n in '$UPSTREAM'.split()))")
# The venv's pytest (not python -m pytest): the checkout's root is not put on sys.path, so the tests
# import the package installed above, as a user's machine would.
cd "$ROOT"
"$work/venv/bin/pytest" -q -p no:cacheprovider --basetemp="$work/pytest" $TESTS
