"""benchmarks/gpu_check.sh's stage logic, on the CPU through --dry-run (commands replaced by stand-ins):
summary.json after every stage, failures and time-outs recorded per part, --quick's deadline."""
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils timeout")


def run(tmp_path, *args, **env):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", *args], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, OUT=str(out), **env), timeout=120)
    summary = json.loads((out / "summary.json").read_text())
    return proc, summary, out


def parts(summary):
    return {p["name"]: p["status"] for s in summary["stages"] for p in s["parts"]}


def test_syntax():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_all_stages_pass(tmp_path):
    proc, summary, out = run(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert summary["status"] == "pass" and summary["dry_run"] is True
    assert [s["stage"] for s in summary["stages"]] == [1, 2, 3]
    assert all(s["status"] == "pass" for s in summary["stages"])
    assert "kernel tests on CUDA" in parts(summary)
    assert {"kernel benchmark", "fused kernel benchmark"} <= set(parts(summary))
    assert {p.name for p in out.iterdir()} >= {"summary.json", "stage1.log", "stage2.log", "stage3.log"}
    assert len(list(out.iterdir())) <= 8  # what the device tool brings back from $OUT


def test_failure_is_recorded_and_later_stages_still_run(tmp_path):
    proc, summary, _ = run(tmp_path, GPU_CHECK_FAKE_FAIL="end-to-end")
    assert proc.returncode == 1
    assert summary["status"] == "fail"
    assert [s["status"] for s in summary["stages"]] == ["fail", "pass", "pass"]
    assert parts(summary)["end-to-end: Triton backend == torch backend"] == "fail"
    assert "FAILED: end-to-end" in proc.stdout


def test_stage_selection(tmp_path):
    proc, summary, out = run(tmp_path, "--stages", "2")
    assert proc.returncode == 0
    assert [s["stage"] for s in summary["stages"]] == [2]
    assert not (out / "stage1.log").exists()


def test_quick_deadline_times_out_then_skips(tmp_path):
    # Deadline 5 s, parts of 3 s: the first fits, the second is cut at the deadline, the rest skipped.
    proc, summary, _ = run(tmp_path, "--quick", "--stages", "1", GPU_CHECK_DEADLINE_S="5", GPU_CHECK_MIN_PART_S="1",
                           GPU_CHECK_FAKE_SLEEP="3")
    assert proc.returncode == 1
    statuses = list(parts(summary).values())
    assert statuses[0] == "pass" and statuses[1] == "timeout"
    assert statuses[2:] == ["skipped"] * (len(statuses) - 2)
