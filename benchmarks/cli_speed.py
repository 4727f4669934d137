"""One real model and one prompt through `nudge demo`, `nudge generate` and `nudge serve`: do they agree?

SmolLM2-135M-Instruct (`nudge fetch-smollm2`), greedy, its chat template, the demo's second question;
each command in its own process, as a user runs it:
  demo      `nudge demo` (the real model answers first; its second answer's line is read)
  generate  `nudge generate --base SMOL --chat QUESTION --max-tokens 48`
  serve     `nudge serve --base SMOL`, then the same chat request twice, streamed; the second is timed
            (decode rate: tokens after the first over the time after the first, as the commands print)
for each --threads value ("default": no option) and each --load (busy processes beside it: Python loops in
20-80 ms bursts, or with --load-kind torch small torch operations on two OpenMP threads, as a test suite runs); --repeats runs of each, interleaved (rotated order), medians. --tree runs another checkout's commands (its `python -m nudge_engine`), for a before/after; that
checkout's CLI may print the whole call's rate (prompt included), which --tree reports as it is.

    python -m benchmarks.cli_speed [--threads default,1,2] [--load 0,1] [--tree DIR] [--out DIR]
"""
from __future__ import annotations

import os

# The caller's own OpenMP wait policy, before anything here imports nudge_engine (which sets one): the
# commands run under it, so a --tree checkout that sets none runs as its users would run it.
CALLER_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY")

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import hardware, report  # noqa: E402
from benchmarks.draft_matrix import start_load, stop_load  # noqa: E402
from benchmarks.serving import free_port  # noqa: E402

MAX_TOKENS = 48
# Another torch job, as a test suite is: small operations on two OpenMP threads, under the runtime's own wait policy.
TORCH_LOOP = """
import os
os.environ.pop("OMP_WAIT_POLICY", None)
import torch
torch.set_num_threads(2)
a, b = torch.randn(64, 256), torch.randn(256, 256)
parent = os.getppid()
while os.getppid() == parent:
    for _ in range(50):
        (a @ b).softmax(-1).sum()
"""


def start_torch_load(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", TORCH_LOOP]) for _ in range(n)]
RATE = re.compile(r"([0-9.]+) tokens/s")


def smollm2() -> str:
    from nudge_engine.model.real_model import fetch_smollm2
    return str(fetch_smollm2())


def nudge_cmd(tree: Path, *args: str) -> tuple[list[str], dict]:
    env = dict(os.environ, PYTHONPATH=str(tree) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("OMP_WAIT_POLICY", None)
    if CALLER_WAIT_POLICY is not None:
        env["OMP_WAIT_POLICY"] = CALLER_WAIT_POLICY
    return [sys.executable, "-m", "nudge_engine", *args], env


def threads_args(threads: str) -> list[str]:
    return [] if threads == "default" else ["--threads", threads]


def run_generate(tree: Path, model: str, question: str, threads: str) -> float:
    cmd, env = nudge_cmd(tree, "generate", "--base", model, "--chat", question, "--max-tokens", str(MAX_TOKENS),
                         "--color", "never", *threads_args(threads))
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=True).stdout
    return float(RATE.findall(out)[-1])


def run_demo(tree: Path, threads: str) -> float:
    cmd, env = nudge_cmd(tree, "demo", "--dir", str(Path(os.environ.get("TMPDIR", "/tmp")) / "nudge-cli-speed-tiny"),
                         "--color", "never", *threads_args(threads))
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=True).stdout
    real = out.split("== nudging on a tiny pair")[0]
    return float(RATE.findall(real)[-1])   # the second question's answer


class Server:
    """`nudge serve` for one thread setting, kept up while the other commands run beside it (idle)."""

    def __init__(self, tree: Path, model: str, threads: str):
        import httpx
        port = free_port()
        cmd, env = nudge_cmd(tree, "serve", "--base", model, "--port", str(port), "--log-level", "warning",
                             "--served-model-name", "m", *threads_args(threads))
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{port}"
        for _ in range(1200):
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)

    def rate(self, question: str) -> float:
        _stream_rate(self.url, question)          # the first warms the server up, as the demo's warm-up does
        return _stream_rate(self.url, question)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


def _stream_rate(url: str, question: str) -> float:
    import httpx
    body = {"model": "m", "messages": [{"role": "user", "content": question}], "max_tokens": MAX_TOKENS,
            "temperature": 0, "stream": True}
    stamps = []
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as resp:
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line.strip() == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            n = len(chunk["choices"][0].get("sources") or []) if chunk.get("choices") else 0
            if n:
                stamps.append((time.perf_counter(), n))
    tokens = sum(n for _, n in stamps)
    return (tokens - stamps[0][1]) / max(stamps[-1][0] - stamps[0][0], 1e-9) if len(stamps) > 1 else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="default,1,2")
    ap.add_argument("--load", default="0,1", help="busy processes beside the commands, per pass")
    ap.add_argument("--load-kind", choices=("python", "torch"), default="python",
                    help="python: a busy loop in bursts; torch: small torch operations on 2 OpenMP threads (a test suite)")
    ap.add_argument("--tree", default=None, help="another checkout whose commands to run (default: this one)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each command, interleaved; medians")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from nudge_engine.cli import DEMO_QUESTIONS
    question = DEMO_QUESTIONS[1]
    tree = Path(args.tree).resolve() if args.tree else hardware.ROOT
    model = smollm2()
    device = hardware.setup_device("cpu")
    rows = []
    for load in (int(x) for x in args.load.split(",")):
        procs = start_load(load) if args.load_kind == "python" else start_torch_load(load)
        try:
            time.sleep(1 if procs else 0)
            for threads in args.threads.split(","):
                server = Server(tree, model, threads)
                try:
                    runs = {"demo": lambda: run_demo(tree, threads),
                            "generate": lambda: run_generate(tree, model, question, threads),
                            "serve": lambda: server.rate(question)}
                    got = {name: [] for name in runs}
                    names = list(runs)
                    for r in range(args.repeats):     # interleaved, the order rotated per repeat
                        for name in names[r % 3:] + names[:r % 3]:
                            got[name].append(runs[name]())
                finally:
                    server.stop()
                row = dict(load=load, kind=args.load_kind, threads=threads, loadavg=os.getloadavg()[0],
                           **{name: statistics.median(v) for name, v in got.items()}, runs=got)
                row["generate / serve"] = row["generate"] / row["serve"]
                row["demo / serve"] = row["demo"] / row["serve"]
                rows.append(row)
                print(row, flush=True)
        finally:
            stop_load(procs)
    env = hardware.environment(device) | {"tree": str(tree)}
    cols = [("load", "busy processes"), ("kind", "kind"), ("threads", "--threads"), ("loadavg", "load avg"), ("demo", "demo tok/s"),
            ("generate", "generate tok/s"), ("serve", "serve tok/s"), ("generate / serve", "generate / serve"),
            ("demo / serve", "demo / serve")]
    md = (f"# SmolLM2-135M-Instruct through demo, generate and serve ({env['device'].split(' (')[0]}, "
          f"{hardware.usable_cores_label()})\n\nQuestion {question!r}, greedy, {MAX_TOKENS} tokens at most; decode "
          f"tok/s as each command reports it (serve: the second streamed request, tokens after the first over "
          f"the time after the first); medians of {args.repeats} interleaved runs; commands from {tree}; the "
          f"machine was shared with other work.\n\n" + report.markdown_table(rows, cols))
    print(md)
    print("wrote", *report.write_results(args.out, device, "cli-speed", "smollm2", {"env": env, "rows": rows}, md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
