"""Throughput, offline: N requests submitted at once, mixed prompt and output lengths, greedy.

Rows per concurrency N (same seeded request mix for every row):
  engine, base alone          NudgeEngine(base).generate(all N)
  engine, nudging k=0 / k=4   NudgeEngine(base, nudger), gamma as given (auto: ~9% nudged, the paper's regime)
  transformers, base alone    batched generate with left padding, the whole batch at once
                              (split in halves only if it runs out of memory); it decodes every row
                              to the longest requested length, so only the requested tokens count
Output tokens/s = requested output tokens (end tokens ignored) / wall time of the whole batch.
On a GPU the limit column is an upper bound: N x copy bandwidth / (weights + N x KV at the mean
context) per decode step, i.e. every request decoding at once.

    python -m benchmarks.throughput --tiny [--quick]     # CPU: 1, 16, 64 requests
    python3 -m benchmarks.throughput [--quick]           # GPU: OLMo-2-7B + 1B shapes, 1 .. 256 requests
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import draft_compare, hardware, pairs, report, timing, workload  # noqa: E402

SUITE = "throughput"
SIZES = {
    ("tiny", False): dict(counts=(1, 8, 16, 64), prompt=(8, 64), output=(8, 48), ks=(0, 1, 2, 4)),
    ("tiny", True): dict(counts=(1, 16), prompt=(8, 48), output=(8, 32), ks=(4,)),
    ("real", False): dict(counts=(1, 16, 64, 256), prompt=(16, 192), output=(16, 128), ks=(0, 4)),
    ("real", True): dict(counts=(1, 64, 256), prompt=(16, 128), output=(16, 64), ks=(4,)),
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="offline throughput: engine vs transformers batched generate",
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    report.common_args(ap)
    ap.add_argument("--counts", default=None, help="concurrent requests, e.g. 1,16,64,256")
    ap.add_argument("--gamma", default="auto", help="a number, or auto: ~--target-nudged of the tokens nudged")
    ap.add_argument("--target-nudged", type=float, default=pairs.PAPER_NUDGED_FRACTION)
    ap.add_argument("--agreement", type=float, default=None)
    ap.add_argument("--ks", default=None, help="draft tokens for the nudging rows, e.g. 0,4")
    ap.add_argument("--kv-cache-bytes", type=float, default=None, help="per engine (default 256 MiB CPU, 30 GiB GPU)")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def request_mix(tokenizer, n: int, prompt_range, output_range, seed: int):
    rng = random.Random(seed * 1000 + n)
    lengths = [rng.randint(*prompt_range) for _ in range(n)]
    outputs = [rng.randint(*output_range) for _ in range(n)]
    return workload.make_prompts(tokenizer, lengths, seed=seed + n), outputs


def run_engine(eng, prompts, outputs, nudge, device) -> dict:
    from nudge_engine.engine.sampling_params import SamplingParams
    params = [SamplingParams(max_tokens=o, temperature=0, ignore_eos=True) for o in outputs]
    # Warm-up: a few of the same requests, short (kernels compiled, pools touched).
    w = min(len(prompts), 8)
    eng.generate(prompts[:w], [SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)] * w, nudge)
    hardware.sync(device)
    t0 = time.perf_counter()
    outs = eng.generate(prompts, params, nudge)
    hardware.sync(device)
    wall = time.perf_counter() - t0
    tokens = sum(len(o.token_ids) for o in outs)
    assert tokens == sum(outputs), "ignore_eos: every request must give its requested length"
    rounds = sum(o.rounds for o in outs)
    drafted = sum(o.drafted_tokens for o in outs)
    accepted = sum(o.accepted_tokens for o in outs)
    return dict(tokens=tokens, seconds=wall, tok_s=tokens / wall, req_s=len(outs) / wall,
                nudged=sum(s == "nudger" for o in outs for s in o.sources) / tokens if eng.nudger else None,
                acceptance=accepted / drafted if drafted else None,
                acc_per_round=accepted / rounds if rounds and eng.nudger else None,
                preemptions=eng.stats.preemptions)


def run_hf(model, prompts, outputs, device, pad_id: int) -> dict:
    cfg = workload.hf_no_eos(model)
    cfg.pad_token_id = pad_id

    def batch(ps, os_):
        width = max(len(p) for p in ps)
        ids = torch.full((len(ps), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(ps), width), dtype=torch.long)
        for i, p in enumerate(ps):  # left padding
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        with torch.no_grad():
            out = model.generate(ids.to(device), attention_mask=mask.to(device), generation_config=cfg,
                                 max_new_tokens=max(os_), min_new_tokens=max(os_))
        return (out.shape[1] - width) * len(ps)

    batch(prompts[:2], [4, 4])  # warm-up
    chunks = 1
    while True:
        size = -(-len(prompts) // chunks)
        try:
            hardware.sync(device)
            t0 = time.perf_counter()
            generated = 0
            for s in range(0, len(prompts), size):
                generated += batch(prompts[s:s + size], outputs[s:s + size])
            hardware.sync(device)
            wall = time.perf_counter() - t0
            break
        except torch.OutOfMemoryError:
            hardware.free_memory(device)
            if size == 1:
                raise
            chunks *= 2
    tokens = sum(outputs)
    return dict(tokens=tokens, seconds=wall, tok_s=tokens / wall, req_s=len(prompts) / wall,
                generated_incl_padding=generated, hf_batches=chunks)


def main(argv=None) -> int:
    from nudge_engine.engine import NudgeEngine
    from nudge_engine.engine.sampling_params import NudgeParams

    args = parse_args(argv)
    device, dtype, models = report.resolve_common(args)
    kind = "tiny" if models == "tiny" else "real"
    size = dict(SIZES[(kind, args.quick)])
    if args.counts:
        size["counts"] = tuple(int(c) for c in args.counts.split(","))
    if args.ks:
        size["ks"] = tuple(int(k) for k in args.ks.split(","))
    agreement = args.agreement if args.agreement is not None else workload.DEFAULT_AGREEMENT[kind]
    torch_dtype = getattr(torch, dtype)
    log = timing.Log(args.time_budget)
    env = hardware.environment(device)
    log(f"throughput suite on {env['device']}, models {models}, dtype {dtype}, commit {env['commit']}")
    workload.quiet_transformers()
    pair = pairs.make_pair(models, agreement, device, dtype, shrink=args.shrink, seed=args.seed,
                            work_dir=Path(args.work_dir) if args.work_dir else None, log=log)
    copy_gbps = hardware.copy_bandwidth_gbps(device) if device.type == "cuda" else float("nan")
    if copy_gbps == copy_gbps:
        log(f"device-to-device copy bandwidth: {copy_gbps:.0f} GB/s")
    kv = int(args.kv_cache_bytes) if args.kv_cache_bytes else (30 << 30 if device.type == "cuda" else 256 << 20)
    max_n = max(size["counts"])
    rows: list[dict] = []

    last: dict[str, tuple[int, float]] = {}   # engine -> (n, seconds) of its latest run
    adaptive_name = f"engine, nudging adaptive k<={max(size['ks'])} (default)"
    configs = [f"engine, nudging k={k}" for k in size["ks"]] + [adaptive_name, "engine, base alone"] + (
        [] if args.no_hf else ["transformers generate, base alone"])
    reserve_each = 30.0 if device.type == "cuda" else 10.0   # a later engine's load + its smallest batch

    def fits(engine_name, n) -> bool:
        """Time budget: predict this run from the same engine's previous one (time ~ sqrt of the batch),
        keeping a reserve for every engine still to come so that each gets its small batches."""
        reserve = reserve_each * (len(configs) - 1 - configs.index(engine_name))
        if engine_name not in last:
            return log.left() - reserve > 20
        prev_n, prev_s = last[engine_name]
        predicted = prev_s * max(1.0, (n / prev_n) ** 0.5) * 1.5 + 10
        if log.left() - reserve > predicted + 15:
            return True
        log.skip(f"{engine_name}, {n} requests (predicted {predicted:.0f} s, {log.left():.0f} s left)")
        return False

    def add(engine_name, n, row, **extra):
        last[engine_name] = (n, row["seconds"])
        row = dict(row, engine=engine_name, concurrency=n, **extra)
        rows.append(row)
        log(f"{engine_name:34s} N={n:4d}: {row['tok_s']:9.1f} tok/s, {row['seconds']:6.2f} s"
            + (f", nudged {row['nudged']:.1%}" if row.get("nudged") is not None else ""))

    def engine(nudger):
        t0 = time.perf_counter()
        e = NudgeEngine(pair.base, nudger, device=device, dtype=dtype, kv_cache_bytes=kv, max_num_seqs=max_n)
        log(f"loaded engine ({'pair' if nudger else 'base alone'}) in {time.perf_counter() - t0:.1f}s")
        return e

    eng = engine(pair.nudger)
    tok = eng.tokenizer
    mixes = {n: request_mix(tok, n, size["prompt"], size["output"], args.seed) for n in size["counts"]}
    calibration = []
    if args.gamma == "auto":
        cal_prompts = workload.make_prompts(tok, [size["prompt"][1]] * 2, seed=args.seed)
        gamma, calibration = workload.calibrate_gamma(eng, cal_prompts, size["output"][1], args.target_nudged, iters=6)
        log(f"gamma {gamma} nudges ~{dict(calibration)[gamma]:.1%} on the calibration prompts")
    else:
        gamma = float(args.gamma)
    variants = [(f"engine, nudging k={k}", k, False) for k in size["ks"]]
    variants.append((adaptive_name, max(size["ks"]), True))
    for name, k, adaptive in variants:
        for n in size["counts"]:
            if fits(name, n):
                nudge = NudgeParams(gamma=gamma, draft_tokens=k, adaptive_drafting=adaptive)
                add(name, n, run_engine(eng, *mixes[n], nudge, device), gamma=gamma, k=k)
    del eng
    hardware.free_memory(device)
    eng = engine(None)
    for n in size["counts"]:
        if fits("engine, base alone", n):
            add("engine, base alone", n, run_engine(eng, *mixes[n], None, device))
    del eng
    hardware.free_memory(device)
    if not args.no_hf:
        model = workload.load_hf(pair.base, device, torch_dtype)
        pad = json.loads((pair.base / "config.json").read_text()).get("pad_token_id") or 0
        hf_name = "transformers generate, base alone"
        for n in size["counts"]:
            if not fits(hf_name, n):
                continue
            try:
                add(hf_name, n, run_hf(model, *mixes[n], device, pad))
            except Exception as e:  # noqa: BLE001 - record, go on
                rows.append(dict(engine="transformers generate, base alone", concurrency=n, error=repr(e)[:200]))
                log(f"transformers N={n}: {e!r}")
        del model
        hardware.free_memory(device)

    # ratios vs transformers and vs base alone at the same N; GPU limit upper bound
    base_cfg = json.loads((pair.base / "config.json").read_text())
    w_read = pairs.weight_bytes(pair.base) - base_cfg["vocab_size"] * base_cfg["hidden_size"] * torch.empty(
        (), dtype=torch_dtype).element_size()
    kvb = pairs.kv_bytes_per_token(pair.base, torch_dtype)
    mean_ctx = sum(size["prompt"]) / 2 + sum(size["output"]) / 4
    for r in rows:
        if "tok_s" not in r:
            continue
        n = r["concurrency"]
        hf = next((x for x in rows if x["engine"].startswith("transformers") and x["concurrency"] == n and "tok_s" in x),
                  None)
        base = next((x for x in rows if x["engine"] == "engine, base alone" and x["concurrency"] == n), None)
        r["vs_hf"] = r["tok_s"] / hf["tok_s"] if hf else None
        r["vs_base"] = r["tok_s"] / base["tok_s"] if base else None
        if copy_gbps == copy_gbps:
            r["limit_tok_s"] = n * copy_gbps * 1e9 / (w_read + n * kvb * mean_ctx)
            r["frac_limit"] = r["tok_s"] / r["limit_tok_s"]
    order = ["engine, base alone"] + [f"engine, nudging k={k}" for k in size["ks"]] + ["transformers generate, base alone"]
    rows.sort(key=lambda r: (r["concurrency"], order.index(r["engine"]) if r["engine"] in order else 99))

    default_vs_k = draft_compare.compare(rows, "concurrency", lambda r: r["engine"] == adaptive_name,
                                         lambda r: r.get("k") if r["engine"].startswith("engine, nudging k=") else None)
    data = dict(suite=SUITE, env=env, args=vars(args), sizes=size, pair=pair.describe(), gamma=gamma,
                gamma_calibration=calibration, copy_gbps=copy_gbps, rows=rows, skipped=log.skipped, log=log.lines,
                default_vs_k=default_vs_k)
    md = to_markdown(data)
    print()
    print(md)
    json_path, md_path = report.write_results(args.out, device, SUITE, models if args.shrink == 1 else pair.name,
                                              data, md)
    print(f"\nwrote {json_path} and {md_path}")
    if not args.no_plot:
        from benchmarks import plot
        print(f"wrote {plot.plot_throughput(data, json_path.with_suffix('.png'))}")
    if args.work_dir is None:
        pairs.remove_pair(pair)
    log("done")
    return 0


COLUMNS = [("concurrency", "requests"), ("engine", "engine"), ("tok_s", "output tok/s"), ("req_s", "req/s"),
           ("seconds", "wall s"), ("nudged", "nudged"), ("acceptance", "acceptance"), ("vs_base", "vs base alone"),
           ("vs_hf", "vs transformers")]


def to_markdown(data: dict) -> str:
    env, size, pair = data["env"], data["sizes"], data["pair"]
    cols = list(COLUMNS)
    gpu = data["copy_gbps"] == data["copy_gbps"] and data["copy_gbps"]
    if gpu:
        cols += [("limit_tok_s", "limit tok/s (upper bound)"), ("frac_limit", "fraction of limit")]
    rows = [dict(r, tok_s=r.get("tok_s"), engine=r["engine"] + (f" ({r['error']})" if "error" in r else "")
                 + (f" [{r['hf_batches']} batches]" if r.get("hf_batches", 1) > 1 else "")) for r in data["rows"]]
    cal = dict(map(tuple, data["gamma_calibration"])) if data["gamma_calibration"] else {}
    lines = [f"# Throughput, offline — {env['device']}", "",
             f"commit {env['commit']}{' (dirty tree)' if env['dirty'] else ''}, {env['date']}, torch {env['torch']}, "
             f"transformers {env.get('transformers')}" + (f", triton {env.get('triton')}" if env.get("triton") else ""),
             "",
             f"Models: {pair['name']} — base {pair['base_config']['params'] / 1e6:.1f}M params, nudger "
             f"{pair['nudger_config']['params'] / 1e6:.1f}M params, {data['args']['dtype']}, agreement knob "
             f"{pair['agreement_written']}. {'; '.join(pair['notes'])}.",
             f"Requests: prompts uniform in {size['prompt'][0]}..{size['prompt'][1]} tokens, outputs uniform in "
             f"{size['output'][0]}..{size['output'][1]} tokens (end tokens ignored), greedy, all submitted at once. "
             f"gamma = {data['gamma']}" + (f" (auto: ~{cal.get(data['gamma'], float('nan')):.1%} nudged on the "
                                          "calibration prompts)" if cal else "") + ".",
             "transformers decodes every row of a batch to the batch's longest output; only requested tokens count.",
             ""]
    lines.append(report.markdown_table(rows, cols))
    lines += draft_compare.lines(data.get("default_vs_k", []), "concurrency")
    if gpu:
        lines += ["", f"Copy bandwidth {data['copy_gbps']:.0f} GB/s (device to device, read + write, this run). "
                      "Limit = requests x bandwidth / (base weights + requests x KV at the mean context) per step."]
    if data.get("skipped"):
        lines += ["", "Skipped to stay within the time budget: " + "; ".join(data["skipped"]) + "."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
