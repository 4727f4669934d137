# Two commands do all set-up on a fresh machine:
#   make demo   -- venv, torch (only if none importable), package + C++ core, tiny models, a nudged generation
#   make test   -- the same set-up, then the test suite
# Versions are locked: constraints.txt (the suite last passed with them; `make lock` updates it) and
# constraints-torch.txt (the CPU torch + triton, installed only where no torch is importable).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

LOCK_VENV ?= .venv-lock

.PHONY: setup demo test lock clean

setup: $(STAMP)

$(STAMP): setup.py constraints.txt constraints-torch.txt $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	# Keep a machine's own (CUDA) torch; otherwise take the locked CPU build that lies on disk.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q -r constraints-torch.txt
	$(PY) -m pip install -q -U "pip>=24" "setuptools>=69" wheel
	$(PY) -m pip install -q -c constraints.txt "pybind11>=2.12"
	$(PY) -m pip install -q -c constraints.txt --no-build-isolation -e ".[test,bench]"
	touch $(STAMP)

demo: setup
	$(PY) -m nudge_engine.cli demo

test: setup
	$(PY) -m pytest -q tests; rc=$$?; [ $$rc -ne 5 ] || echo 'pytest collected no tests'; exit $$rc

# Update the lock: a fresh venv with the newest releases (torch kept as installed), the whole suite
# there, and constraints.txt rewritten only if it passed. Then commit constraints.txt.
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv --system-site-packages $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -c "import torch" 2>/dev/null || $(LOCK_VENV)/bin/python -m pip install -q -r constraints-torch.txt
	$(LOCK_VENV)/bin/python -m pip freeze | grep -E '^(torch|triton)==' > $(LOCK_VENV)/torch-pin.txt || true
	$(LOCK_VENV)/bin/python -m pip install -q -U pip setuptools wheel pybind11
	$(LOCK_VENV)/bin/python -m pip install -q -U --upgrade-strategy eager -c $(LOCK_VENV)/torch-pin.txt --no-build-isolation -e ".[test,bench]"
	$(LOCK_VENV)/bin/python -m pytest -q tests
	$(LOCK_VENV)/bin/python .ci/lock.py
	$(MAKE) setup   # .venv back on the (new) lock; the editable install points at this checkout again

clean:
	rm -rf build $(VENV) $(LOCK_VENV) nudge_engine/_core*.so *.egg-info
