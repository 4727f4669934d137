"""Smoke tests of the benchmark suites (no timings are checked: performance is shown by benchmarks).

- the notebook re-implementation writes exactly the engine's greedy nudged output;
- `python -m benchmarks.latency --tiny --quick` runs and writes its files;
- the agreement knob: in place == written, and on real-depth pairs of different widths the shared
  bigram makes both models identical at agreement 1 and the knob moves their agreement.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import pairs, workload
from benchmarks.notebook_nudging import NotebookNudging
from nudge_engine.engine import NudgeEngine
from nudge_engine.engine.sampling_params import NudgeParams, SamplingParams

ROOT = Path(__file__).resolve().parents[1]
MAX_TOKENS = 24
pytestmark = pytest.mark.filterwarnings("ignore:.*past_key_values.*:FutureWarning")


@pytest.fixture(scope="module")
def pair_and_prompts(tiny_pair):
    base, nudger = tiny_pair("llama", "llama", "bytelevel", agreement=0.6)
    engine = NudgeEngine(base, nudger)
    notebook = NotebookNudging.from_folders(base, nudger)
    prompts = workload.make_prompts(engine.tokenizer, [5, 17, 30], seed=3)
    return engine, notebook, prompts


@pytest.mark.parametrize("gamma,roa", [(0.2, True), (0.4, True), (0.4, False), (0.7, True)])
def test_notebook_equals_engine_greedy(pair_and_prompts, gamma, roa, check_pools):
    engine, notebook, prompts = pair_and_prompts
    check_pools(engine)
    outs = engine.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0),
                           NudgeParams(gamma=gamma, draft_tokens=4, resume_on_agreement=roa))
    handoffs = 0
    for prompt, out in zip(prompts, outs):
        nb = notebook.generate(prompt, prompt, MAX_TOKENS, gamma, resume_on_agreement=roa)
        assert nb.token_ids == out.token_ids
        assert nb.sources == out.sources
        # the notebook's cost model: one base and one nudger forward per token (plus the prefills)
        assert nb.base_forwards == nb.nudger_forwards == len(nb.token_ids)
        handoffs += "nudger" in nb.sources and "base" in nb.sources
    assert handoffs >= 1, "no prompt switched models: the comparison proves little"


def test_latency_tiny_quick_writes_results(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.latency", "--tiny", "--quick", "--graph-rows", "on",
                           "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(p.name for p in tmp_path.iterdir())
    assert any(f.endswith("_latency.json") for f in files) and any(f.endswith("_latency.md") for f in files)
    assert any(f.endswith("_latency.png") for f in files), files
    data = json.loads(next(tmp_path.glob("*_latency.json")).read_text())
    labels = [r["label"][:3] for r in data["rows"]]
    assert labels.count("(b)") == 5 and all(x in labels for x in ("(a)", "(c)", "(d)", "(e)"))
    assert data["nudged_outputs_identical_for_every_k"]
    graph_rows = [r for r in data["rows"] if r["label"].startswith("(g)")]   # eager vs the CPU's replay emulation
    assert sorted(r["graph_mode"] for r in graph_rows) == ["eager", "eager", "replay", "replay"]
    assert data["graphs_same_output"] is True
    assert next(r for r in data["rows"] if r["label"].startswith("(d)"))["equals_engine"] == "2/2"
    assert data["sweep"] and all(s["same_output"] for s in data["sweep"])
    assert "| (d) notebook" in proc.stdout  # the table is printed


def test_agreement_knob_in_place_equals_written(tmp_path):
    """Rescaling the loaded engine's residual branches gives the engine of a pair written at that agreement."""
    written = pairs.tiny_pair(tmp_path / "w", 0.6)
    moved = pairs.tiny_pair(tmp_path / "m", 0.9)
    engine = NudgeEngine(moved.base, moved.nudger)
    pairs.AgreementKnob(moved.family, moved.agreement, pairs.engine_modules(engine)).set(0.6)
    ref = NudgeEngine(written.base, written.nudger)
    prompts = workload.make_prompts(engine.tokenizer, [9, 21], seed=5)
    params = SamplingParams(max_tokens=16, temperature=0)
    for nudge in (NudgeParams(gamma=0.0), NudgeParams(gamma=0.4, draft_tokens=4)):
        got = engine.generate(prompts, params, nudge)
        want = ref.generate(prompts, params, nudge)
        assert [o.token_ids for o in got] == [o.token_ids for o in want]
        assert [o.sources for o in got] == [o.sources for o in want]


@pytest.mark.parametrize("name", ["olmo2-7b", "llama3-8b"])
def test_real_shape_pair_shares_a_bigram_and_the_knob_moves_agreement(tmp_path, name):
    """Widths divided by 64 (layers and vocabulary as real): base and nudger differ in width."""
    pair = pairs.real_shape_pair(name, 0.0, torch.device("cpu"), "float32", shrink=64, out_dir=tmp_path,
                                  log=lambda _: None)
    cfg = [json.loads((f / "config.json").read_text()) for f in (pair.base, pair.nudger)]
    assert cfg[0]["hidden_size"] == 2 * cfg[1]["hidden_size"] and cfg[0]["num_hidden_layers"] == 32
    from transformers import AutoModelForCausalLM
    models = [AutoModelForCausalLM.from_pretrained(str(f), dtype=torch.float32).eval() for f in (pair.base, pair.nudger)]
    knob = pairs.AgreementKnob(pair.family, 0.0, models)
    ids = torch.tensor([list(range(8, 128))])
    agree = {}
    for a in (1.0 - 1e-9, 0.98, 0.9, 0.5):
        knob.set(a)
        with torch.no_grad():
            lb, ln = (m(ids).logits[0] for m in models)
        agree[a] = (lb.argmax(-1) == ln.argmax(-1)).float().mean().item()
        if a > 0.999:
            torch.testing.assert_close(lb[:, :pairs.TOKENIZER_SIZE], ln[:, :pairs.TOKENIZER_SIZE],
                                       atol=2e-3, rtol=1e-3)
        # padded ids (past the 512-token tokenizer) hold no probability and never win
        assert lb.softmax(-1)[:, pairs.TOKENIZER_SIZE:].sum(-1).max() < 1e-3
    assert agree[1.0 - 1e-9] == 1.0
    assert agree[1.0 - 1e-9] > agree[0.98] > agree[0.9] >= agree[0.5]
    assert agree[0.98] > 0.5 and agree[0.5] < 0.2


def test_every_benchmark_module_imports():
    """A moved helper must not leave a suite that fails only when someone runs it. In a fresh
    interpreter: some modules set up the process at import (the compile gate's Triton, the launch
    recorder's hooks), which must not leak into the other tests."""
    root = Path(__file__).resolve().parents[1]
    names = sorted(p.stem for p in (root / "benchmarks").glob("*.py") if p.stem != "__init__")
    assert len(names) > 20
    code = "import importlib\nfor n in %r:\n    importlib.import_module('benchmarks.' + n)\n" % names
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_host_round_before_and_after_side_by_side(tmp_path):
    """bench_host_round --before: worker processes for two trees (here the same one twice), one table."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_host_round", "--quick", "--before", str(ROOT),
                           "--repeats", "1", "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(next(tmp_path.glob("*_host_round.json")).read_text())
    rows = data["rows"]
    assert [(r["requests"], r["config"]) for r in rows][:4] == [(1, "base alone"), (1, "nudged k=0"), (1, "nudged k=4"),
                                                               (1, "nudged default")]
    assert all(r["eager before ms"] > 0 and r["eager after ms"] > 0 and r["after host reads/round"] == 1.0 for r in rows)
    assert "before" in next(tmp_path.glob("*_host_round.md")).read_text()
