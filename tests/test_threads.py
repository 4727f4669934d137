"""CPU threads (nudge_engine/threads.py): the default count, `threads=` / `--threads`, the OpenMP wait policy."""
import os
import re
import subprocess
import sys

import pytest
import torch

from nudge_engine import cli
from nudge_engine.engine import NudgeEngine
from nudge_engine.threads import default_threads, set_threads, usable_cores


@pytest.fixture
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_the_default_is_the_usable_cores_and_never_more_than_torch_would_use():
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert usable_cores() == cores
    assert default_threads(64) == cores and default_threads(1) == 1


def test_the_engine_takes_threads_and_refuses_bad_counts(tiny_model, keep_threads):
    base = tiny_model("llama")
    engine = NudgeEngine(base, threads=1)
    assert engine.threads == 1 and torch.get_num_threads() == 1
    torch.set_num_threads(64)
    assert NudgeEngine(base).threads == min(64, usable_cores()) == torch.get_num_threads()
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="threads must be an integer >= 1"):
            set_threads(bad)


def test_importing_the_package_makes_openmp_wait_passively_unless_told_otherwise():
    code = "import os, nudge_engine, torch; print(os.environ.get('OMP_WAIT_POLICY'))"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "PASSIVE"
    out = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_WAIT_POLICY": "ACTIVE"}, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "ACTIVE"
    late = "import os, torch, nudge_engine; print(os.environ.get('OMP_WAIT_POLICY'))"   # torch first: too late
    out = subprocess.run([sys.executable, "-c", late], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None"


def test_cli_threads_option(tiny_pair, capsys, keep_threads):
    base, nudger = tiny_pair("llama", "llama", "bytelevel", 0.5)
    args = ["generate", "--base", str(base), "--nudger", str(nudger), "--prompt", "Once upon a time", "--max-tokens", "8"]
    assert cli.main(args + ["--threads", "1"]) == 0 and torch.get_num_threads() == 1
    assert re.search(r"[0-9.]+ tokens/s \(first token after \d+ ms\)", capsys.readouterr().out)
    for bad in ("0", "x"):
        with pytest.raises(SystemExit) as e:
            cli.main(args + ["--threads", bad])
        assert e.value.code == 2
        assert "--threads: must be an integer >= 1" in capsys.readouterr().err
    parser = cli.build_parser()
    for argv in (["serve", "--base", "x"], ["demo"], ["bench", "--threads", "3", "host_round"], ["generate", "--base", "x"]):
        parsed = parser.parse_args(argv if "--threads" in argv else argv[:1] + ["--threads", "3"] + argv[1:])
        assert parsed.threads == 3, argv
