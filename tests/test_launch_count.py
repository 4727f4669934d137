"""The launch-count target holds (at most 10 kernels per decoder layer with the Triton backend), and
the fused-kernel benchmark runs (CPU smoke: interpreter, tiny shapes; no timings are checked)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]
MAX_KERNELS_PER_LAYER = 10  # two norms, four GEMMs, activation, rotary + store, attention and its combine


def test_triton_backend_runs_at_most_10_kernels_per_layer():
    # One family per norm layout: pre-norm with a clip (OLMo), post-norm with QK-norm (OLMo-2), sandwich (Gemma-2).
    proc = subprocess.run([sys.executable, "-m", "benchmarks.launch_count", "--families", "olmo", "olmo2", "gemma2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = dict(re.findall(r"^(\w+): (\d+) kernels per layer", proc.stdout, re.M))
    assert set(counts) == {"olmo", "olmo2", "gemma2"}, proc.stdout
    assert all(0 < int(n) <= MAX_KERNELS_PER_LAYER for n in counts.values()), proc.stdout


def test_bench_fused_smoke(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/bench_fused.py", "--smoke", "--out-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(list(tmp_path.glob("*_fused.md"))) == 1
