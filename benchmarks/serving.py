"""Serving: `nudge serve` on loopback, Poisson arrivals at given rates, streaming completions.

For each server (base alone, nudging) and each rate: requests arrive with exponential gaps
(seeded), at most --num-requests of them and none after --duration seconds; each streams
`/v1/completions` (token-id prompts, greedy, ignore_eos, fixed lengths drawn per request). Reported:
request throughput, output tokens/s, TTFT, TPOT and ITL (median / p90 / p99) and failures, which
must be 0 (an HTTP error, an error chunk, a broken stream or a short answer counts as one).

  TTFT  send -> first chunk carrying a token
  TPOT  (last token chunk - first token chunk) / (tokens - 1), per request
  ITL   gap between successive token-carrying chunks (a nudged round may carry several tokens)

The server is started as `python -m nudge_engine serve --base P [--nudger P] --port N ...` (the
CLI's interface) and stopped at the end; --url points at one already running instead.

    python -m benchmarks.serving --tiny [--quick]
    python3 -m benchmarks.serving --rates 1,4 --num-requests 64    # GPU, OLMo-2-7B + 1B shapes
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import hardware, pairs, report, timing, workload  # noqa: E402

SUITE = "serving"
SIZES = {
    ("tiny", False): dict(rates=(2.0, 8.0), num_requests=40, duration=30.0, prompt=(8, 64), output=(16, 48)),
    ("tiny", True): dict(rates=(4.0,), num_requests=12, duration=15.0, prompt=(8, 48), output=(8, 24)),
    ("real", False): dict(rates=(1.0, 4.0, 16.0), num_requests=96, duration=60.0, prompt=(16, 256), output=(32, 128)),
    ("real", True): dict(rates=(4.0,), num_requests=32, duration=30.0, prompt=(16, 128), output=(16, 64)),
}
START_TIMEOUT_S = 600


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="online serving: Poisson arrivals against `nudge serve`",
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    report.common_args(ap)
    ap.add_argument("--rates", default=None, help="request rates (req/s), comma separated")
    ap.add_argument("--num-requests", type=int, default=None, help="per rate")
    ap.add_argument("--duration", type=float, default=None, help="no new request after this many seconds (per rate)")
    ap.add_argument("--gamma", type=float, default=None, help="default: 0.2 (tiny) / 0.25 (real), ~9-15%% nudged")
    ap.add_argument("--draft-tokens", type=int, default=4)
    ap.add_argument("--agreement", type=float, default=None)
    ap.add_argument("--servers", default="base,nudging", help="which servers to run: base, nudging or both")
    ap.add_argument("--url", default=None, help="an already running server (then only that one is measured)")
    ap.add_argument("--kv-cache-bytes", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, base, nudger, args, log):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "nudge_engine", "serve", "--base", str(base), "--port", str(self.port),
               "--device", args.device, "--dtype", args.dtype, "--draft-tokens", str(args.draft_tokens),
               "--log-level", "warning", "--max-queue", "4096"]
        if nudger is not None:
            cmd += ["--nudger", str(nudger), "--gamma", str(args.gamma)]
        if args.kv_cache_bytes:
            cmd += ["--kv-cache-bytes", str(args.kv_cache_bytes)]
        self.cmd = cmd
        self.log = log
        env = dict(os.environ, PYTHONPATH=str(hardware.ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        if args.device == "cpu":
            env.setdefault("OMP_NUM_THREADS", str(args.threads or 1))
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"nudge-bench-serve-{self.port}.log"
        self.stderr = open(self.log_path, "w+")
        self.healthy = False
        self.proc = subprocess.Popen(cmd, cwd=hardware.ROOT, stdout=subprocess.DEVNULL, stderr=self.stderr, env=env)

    def wait_ready(self) -> float:
        import httpx
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < START_TIMEOUT_S:
            if self.proc.poll() is not None:
                self.stderr.seek(0)
                raise RuntimeError(f"server exited ({self.proc.returncode}): {self.stderr.read()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    self.healthy = True
                    return time.perf_counter() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server not ready after {START_TIMEOUT_S}s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()
        if self.healthy:  # keep the server's log only when it failed to start
            self.log_path.unlink(missing_ok=True)


async def one_request(client, url: str, prompt: list[int], max_tokens: int, send_at: float, t0: float) -> dict:
    await asyncio.sleep(max(0.0, t0 + send_at - time.perf_counter()))
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    stamps: list[tuple[float, int]] = []
    nudged = 0
    error = None
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
            else:
                async for line in resp.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data.strip() == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        error = f"error chunk: {chunk['error']}"
                        break
                    for choice in chunk.get("choices", []):
                        n = len(choice.get("sources") or [])
                        if n:
                            stamps.append((time.perf_counter(), n))
                            nudged += sum(s == "nudger" for s in choice["sources"])
    except Exception as e:  # noqa: BLE001 - a failure to report, not to raise
        error = repr(e)[:200]
    done = time.perf_counter()
    tokens = sum(n for _, n in stamps)
    if error is None and tokens != max_tokens:
        error = f"short answer: {tokens} of {max_tokens} tokens"
    out = dict(sent=sent - t0, done=done - t0, tokens=tokens, nudged=nudged, error=error)
    if stamps:
        out["ttft"] = stamps[0][0] - sent
        out["itl"] = [b[0] - a[0] for a, b in zip(stamps, stamps[1:])]
        out["tpot"] = (stamps[-1][0] - stamps[0][0]) / (tokens - 1) if tokens > 1 else None
    return out


async def run_rate(url: str, rate: float, prompts, outputs, duration: float, seed: int) -> tuple[dict, list]:
    import httpx
    rng = random.Random(seed)
    at, times = 0.0, []
    for _ in prompts:
        at += rng.expovariate(rate)
        if at > duration:
            break
        times.append(at)
    limits = httpx.Limits(max_connections=len(times) + 4, max_keepalive_connections=len(times) + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one_request(client, url, p, o, s, t0)
                                         for p, o, s in zip(prompts, outputs, times)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if r["error"] is None]
    ms = lambda xs, q: 1e3 * timing.percentile(xs, q)  # noqa: E731
    ttft = [r["ttft"] for r in ok]
    tpot = [r["tpot"] for r in ok if r.get("tpot") is not None]
    itl = [x for r in ok for x in r["itl"]]
    tokens = sum(r["tokens"] for r in ok)
    row = dict(rate=rate, sent=len(results), completed=len(ok), failed=len(results) - len(ok), wall_s=wall,
               req_s=len(ok) / wall, tok_s=tokens / wall,
               nudged=sum(r["nudged"] for r in ok) / tokens if tokens else None,
               errors=sorted({r["error"] for r in results if r["error"]})[:5])
    for name, xs in (("ttft", ttft), ("tpot", tpot), ("itl", itl)):
        for q in (50, 90, 99):
            row[f"{name}_p{q}_ms"] = ms(xs, q)
    return row, results


def main(argv=None) -> int:
    args = parse_args(argv)
    device, dtype, models = report.resolve_common(args)
    kind = "tiny" if models == "tiny" else "real"
    size = dict(SIZES[(kind, args.quick)])
    if args.rates:
        size["rates"] = tuple(float(r) for r in args.rates.split(","))
    for key in ("num_requests", "duration"):
        if getattr(args, key) is not None:
            size[key] = getattr(args, key)
    if args.gamma is None:
        args.gamma = 0.2 if kind == "tiny" else 0.25
    agreement = args.agreement if args.agreement is not None else workload.DEFAULT_AGREEMENT[kind]
    log = timing.Log()
    env = hardware.environment(device)
    log(f"serving suite on {env['device']}, models {models}, commit {env['commit']}")
    pair = pairs.make_pair(models, agreement, device, dtype, shrink=args.shrink, seed=args.seed,
                            work_dir=Path(args.work_dir) if args.work_dir else None, log=log)
    from nudge_engine.model.tokenizer import Tokenizer
    tok = Tokenizer(pair.base)
    rng = random.Random(args.seed)
    n = size["num_requests"]
    prompts = workload.make_prompts(tok, [rng.randint(*size["prompt"]) for _ in range(n)], seed=args.seed)
    outputs = [rng.randint(*size["output"]) for _ in range(n)]

    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    rows = []
    for which in (["external"] if args.url else servers):
        server = None
        try:
            if args.url:
                url = args.url.rstrip("/")
            else:
                server = Server(pair.base, pair.nudger if which == "nudging" else None, args, log)
                log(f"server ({which}) ready in {server.wait_ready():.1f}s: {' '.join(server.cmd[2:])}")
                url = server.url
            for i, rate in enumerate(size["rates"]):
                row, _ = asyncio.run(run_rate(url, rate, prompts, outputs, size["duration"], args.seed + i))
                row.update(server=which, gamma=args.gamma if which == "nudging" else None,
                           draft_tokens=args.draft_tokens if which == "nudging" else None)
                rows.append(row)
                log(f"{which:8s} rate {rate:5.1f}/s: {row['completed']}/{row['sent']} ok, {row['req_s']:.2f} req/s, "
                    f"{row['tok_s']:.1f} tok/s, TTFT p50 {row['ttft_p50_ms']:.0f} ms, TPOT p50 "
                    f"{row['tpot_p50_ms']:.1f} ms, failed {row['failed']}")
        except Exception as e:  # noqa: BLE001
            log(f"{which}: {e!r}")
            rows.append(dict(server=which, error=repr(e)[:300], failed=None))
        finally:
            if server:
                server.stop()

    data = dict(suite=SUITE, env=env, args=vars(args), sizes=size, pair=pair.describe(), rows=rows, log=log.lines)
    md = to_markdown(data)
    print()
    print(md)
    json_path, md_path = report.write_results(args.out, device, SUITE, models if args.shrink == 1 else pair.name,
                                              data, md)
    print(f"\nwrote {json_path} and {md_path}")
    if args.work_dir is None:
        pairs.remove_pair(pair)
    failed = sum(r.get("failed") or 0 for r in rows) + sum("error" in r for r in rows)
    return 0 if failed == 0 else 1


COLUMNS = [("server", "server"), ("rate", "rate req/s"), ("completed", "ok"), ("failed", "failed"),
           ("req_s", "req/s"), ("tok_s", "output tok/s"), ("nudged", "nudged"),
           ("ttft_p50_ms", "TTFT p50"), ("ttft_p90_ms", "p90"), ("ttft_p99_ms", "p99"),
           ("tpot_p50_ms", "TPOT p50"), ("tpot_p90_ms", "p90"), ("tpot_p99_ms", "p99"),
           ("itl_p50_ms", "ITL p50"), ("itl_p90_ms", "p90"), ("itl_p99_ms", "p99")]


def to_markdown(data: dict) -> str:
    env, size, pair, args = data["env"], data["sizes"], data["pair"], data["args"]
    lines = [f"# Serving (`nudge serve`, loopback, Poisson arrivals) — {env['device']}", "",
             f"commit {env['commit']}{' (dirty tree)' if env['dirty'] else ''}, {env['date']}, torch {env['torch']}", "",
             f"Models: {pair['name']}, {args['dtype']}, agreement knob {pair['agreement_written']}; nudging server: "
             f"gamma {args['gamma']}, {args['draft_tokens']} draft tokens. Up to {size['num_requests']} requests per "
             f"rate, none sent after {size['duration']:.0f} s; prompts {size['prompt'][0]}..{size['prompt'][1]} tokens, "
             f"outputs {size['output'][0]}..{size['output'][1]} tokens (greedy, ignore_eos), streamed. Times in ms.",
             "", report.markdown_table([r for r in data["rows"] if "error" not in r], COLUMNS, digits=1)]
    errors = [r for r in data["rows"] if "error" in r or r.get("errors")]
    for r in errors:
        lines.append(f"\n{r['server']}: {r.get('error') or '; '.join(r['errors'])}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
