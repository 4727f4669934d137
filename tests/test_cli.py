"""The `nudge` command: help, make-tiny, generate (marked output), demo, bench."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from nudge_engine import cli
from nudge_engine.engine import NudgeEngine
from nudge_engine.engine.sampling_params import SamplingParams

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


# ---------------------------------------------------------------------------- user errors: one line, exit 2
def _one_line_error(out: subprocess.CompletedProcess, *needles: str) -> str:
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert "Traceback" not in out.stderr, out.stderr
    message = lines[-1]
    for needle in needles:
        assert needle in message, message
    return message


@pytest.fixture(scope="module")
def pair_dirs(tiny_pair):
    return [str(p) for p in tiny_pair("llama", "llama", "bytelevel", 0.5)]


@pytest.mark.parametrize("device,needle", [("banana", "not a torch device"), ("cuda", "no usable CUDA"),
                                           ("cuda:7", "CUDA")])
def test_bad_device_is_one_line(pair_dirs, device, needle):
    if device.startswith("cuda") and __import__("torch").cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = run_cli("generate", "--base", pair_dirs[0], "--nudger", pair_dirs[1], "--prompt", "hi", "--device", device)
    _one_line_error(out, device, needle)


def test_tiny_temperature_is_greedy(pair_dirs):
    args = ("generate", "--base", pair_dirs[0], "--nudger", pair_dirs[1], "--prompt", "hi", "--max-tokens", "6",
            "--color", "never")
    tiny = run_cli(*args, "--temperature", "1e-40")
    greedy = run_cli(*args)
    assert tiny.returncode == 0, tiny.stderr
    assert tiny.stdout.splitlines()[0] == greedy.stdout.splitlines()[0]


def test_prompt_that_is_not_utf8(pair_dirs):
    out = subprocess.run([sys.executable, "-m", "nudge_engine", "generate", "--base", pair_dirs[0], "--nudger",
                          pair_dirs[1], "--prompt", b"caf\xe9 \xff"], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    _one_line_error(out, "--prompt is not valid Unicode text")


def test_make_tiny_onto_a_file(tmp_path):
    target = tmp_path / "afile"
    target.write_text("x")
    _one_line_error(run_cli("make-tiny", str(target)), "is a file")


def test_serve_bad_port_fails_before_loading(pair_dirs):
    out = run_cli("serve", "--base", pair_dirs[0], "--port", "99999")
    assert out.returncode == 2 and "must be a TCP port in 1..65535" in out.stderr and "Traceback" not in out.stderr


def test_serve_port_in_use_is_one_line(pair_dirs):
    import socket
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        out = run_cli("serve", "--base", pair_dirs[0], "--port", str(busy.getsockname()[1]))
    _one_line_error(out, "cannot listen on 127.0.0.1")


def test_config_field_of_the_wrong_type_is_named(tmp_path, pair_dirs):
    import json
    import shutil
    folder = tmp_path / "base"
    shutil.copytree(pair_dirs[0], folder)
    config = json.loads((folder / "config.json").read_text())
    config["hidden_size"] = "sixty-four"
    (folder / "config.json").write_text(json.dumps(config))
    out = run_cli("generate", "--base", str(folder), "--nudger", pair_dirs[1], "--prompt", "hi")
    _one_line_error(out, "config.json", "'hidden_size'", "sixty-four")
