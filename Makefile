# Two commands do all set-up on a fresh machine:
#   make demo   -- venv, torch (only if none importable), package + C++ core, tiny models, a nudged generation
#   make test   -- the same set-up, then the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): setup.py $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	# Keep a machine's own (CUDA) torch; otherwise take the CPU build that lies on disk.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -U "pip>=24" "setuptools>=69" wheel "pybind11>=2.12"
	$(PY) -m pip install -q --no-build-isolation -e ".[test,bench]"
	touch $(STAMP)

demo: setup
	$(PY) -m nudge_engine.cli demo

test: setup
	$(PY) -m pytest -q tests; rc=$$?; [ $$rc -ne 5 ] || echo 'pytest collected no tests'; exit $$rc

clean:
	rm -rf build $(VENV) nudge_engine/_core*.so *.egg-info
