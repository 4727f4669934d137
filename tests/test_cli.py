"""The `nudge` command: help, make-tiny, generate (marked output), demo, bench."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from nudge_engine import cli
from nudge_engine.engine import NudgeEngine
from nudge_engine.sampling_params import SamplingParams

REPO = Path(__file__).resolve().parents[1]
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def run_cli(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nudge_engine", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_help():
    out = run_cli("--help")
    assert out.returncode == 0, out.stderr
    for command in ("demo", "generate", "serve", "make-tiny", "bench"):
        assert command in out.stdout


@pytest.mark.parametrize("command", ["demo", "generate", "serve", "make-tiny", "bench"])
def test_subcommand_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    assert f"nudge {command}" in capsys.readouterr().out


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_make_tiny(tmp_path, capsys):
    assert cli.main(["make-tiny", str(tmp_path / "pair"), "--agreement", "0.7"]) == 0
    for name in ("base", "nudger"):
        assert (tmp_path / "pair" / name / "config.json").is_file()
        assert (tmp_path / "pair" / name / "tokenizer.json").is_file()
    assert "nudger:" in capsys.readouterr().out
    assert cli.main(["make-tiny", str(tmp_path / "bad"), "--family", "nope"]) == 2


def _marked_spans(line: str) -> tuple[str, list[str]]:
    return line.replace("[[", "").replace("]]", ""), re.findall(r"\[\[(.*?)\]\]", line, flags=re.S)


def test_generate_marks_nudged_tokens(tiny_pair, capsys):
    base, nudger = tiny_pair("llama", "llama", "bytelevel", 0.5)
    args = ["generate", "--base", str(base), "--nudger", str(nudger), "--prompt", "Once upon a time",
            "--max-tokens", "24"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    text_block, summary = out.rsplit("\n\n", 1)
    m = re.search(r"nudged fraction: ([0-9.]+) \((\d+) of (\d+) tokens\)", summary)
    assert m, summary
    expected = NudgeEngine(base, nudger).generate("Once upon a time", SamplingParams(max_tokens=24, temperature=0))[0]
    plain, spans = _marked_spans(text_block)
    assert plain == expected.text
    assert float(m.group(1)) == pytest.approx(expected.nudged_fraction, abs=0.005)
    assert int(m.group(2)) == expected.sources.count("nudger") and int(m.group(3)) == len(expected.token_ids)
    assert bool(spans) == (expected.sources.count("nudger") > 0)
    assert "\x1b[" not in out                      # not a terminal: brackets, no color
    # gamma > 1: everything is the nudger's; color on request
    assert cli.main(args + ["--gamma", "2", "--no-resume-on-agreement", "--chat", "--color", "always"]) == 0
    out = capsys.readouterr().out
    assert cli.NUDGE_COLOR in out and "nudged fraction: 1.00" in out
    assert ANSI.sub("", out).count("[[") == 0


def test_demo_end_to_end(tmp_path, capsys):
    folder = tmp_path / "tiny"
    # The real-model part of the demo is checked in test_real_model.py.
    out = run_cli("demo", "--dir", str(folder), "--max-tokens", "16", "--tiny-only", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert (folder / "base" / "config.json").is_file() and (folder / "nudger" / "config.json").is_file()
    assert "building a tiny model pair" in out.stdout
    assert "RANDOM weights" in out.stdout and "tokens/s" in out.stdout
    assert re.search(r"nudged fraction: [0-9.]+ \(\d+ of 16 tokens\)", out.stdout)
    # A second run reuses the pair.
    assert cli.main(["demo", "--dir", str(folder), "--max-tokens", "8", "--tiny-only"]) == 0
    assert "building" not in capsys.readouterr().out


def test_bench_lists_and_refuses_unknown(capsys):
    if not (REPO / "benchmarks").is_dir():
        pytest.skip("no benchmarks/ folder")
    assert cli.main(["bench"]) == 0
    assert "bench_host_step" in capsys.readouterr().out
    assert cli.main(["bench", "no_such_benchmark"]) == 2
    assert "no benchmark" in capsys.readouterr().err


def test_mark_nudged_spans():
    class Tok:  # one character per token id
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(i) for i in ids)

    ids = [ord(c) for c in "abcdef"]
    sources = ["base", "nudger", "nudger", "base", "nudger", "base"]
    assert cli.mark_nudged(Tok(), [], ids, sources, "abcdef", color=False) == "a[[bc]]d[[e]]f"
    assert cli.mark_nudged(Tok(), [], ids, sources, "abcd", color=False) == "a[[bc]]d"   # stop string cut
