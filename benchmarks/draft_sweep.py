"""Draft policy sweep: the engine's default (adaptive, k <= 4) beside every fixed k, batch by batch.

For each batch size: the engine, base alone, and nudging with draft_tokens fixed at each k in --ks and
with the default policy, on the same prompts, greedy, fixed output length. Configurations run
interleaved (one repeat of each in a rotated order, then the next repeat), and the table reports
medians, so the load of a shared machine falls on every configuration alike. Columns: tokens/s per
configuration, the default over the best fixed k, nudging over the engine's own base-alone speed.

    python -m benchmarks.draft_sweep --tiny                        # latency cells: batch 1 and 8
    python -m benchmarks.draft_sweep --tiny --batches 4,8,16 --suite throughput-draft
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import hardware, pairs, report, timing, workload  # noqa: E402

DEFAULT_KS = (0, 1, 2, 4)
TARGET_NUDGED = 0.17


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    report.common_args(ap)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--ks", default=",".join(map(str, DEFAULT_KS)))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--gamma", default="auto", help="a number, or auto: nudge ~--target-nudged of the tokens")
    ap.add_argument("--target-nudged", type=float, default=TARGET_NUDGED)
    ap.add_argument("--agreement", type=float, default=None)
    ap.add_argument("--serial-prompts", type=int, default=2,
                    help="the batch-1 cell runs this many prompts one after another (nudging varies by prompt)")
    ap.add_argument("--suite", default="draft-sweep")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def configs(ks, gamma):
    from nudge_engine.engine import DEFAULT_DRAFT_TOKENS
    from nudge_engine.engine.sampling_params import NudgeParams
    out = [("base", None, "base")]
    out += [(f"k={k}", NudgeParams(gamma=gamma, draft_tokens=k, adaptive_drafting=False), "pair") for k in ks]
    out.append(("default", NudgeParams(gamma=gamma, draft_tokens=DEFAULT_DRAFT_TOKENS, adaptive_drafting=True),
                "pair"))
    return out


def sweep_batch(engines, prompts, max_tokens, cfgs, repeats, log, serial: bool = False) -> tuple[dict, dict]:
    """serial: each prompt alone (batch 1), one after another, in each timed repeat."""
    from nudge_engine.engine.sampling_params import SamplingParams
    sp = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)

    def generate(which, nudge):
        if serial:
            return [engines[which].generate([p], sp, nudge)[0] for p in prompts]
        return engines[which].generate(prompts, sp, nudge)
    times = {name: [] for name, _, _ in cfgs}
    outs, nudged = {}, {}
    for name, nudge, which in cfgs:  # warm every configuration (and the policy's cost fits) once
        generate(which, nudge)
    for r in range(repeats):
        order = cfgs[r % len(cfgs):] + cfgs[:r % len(cfgs)]
        for name, nudge, which in order:
            t0 = time.perf_counter()
            res = generate(which, nudge)
            times[name].append(time.perf_counter() - t0)
            outs[name] = [o.token_ids for o in res]
            toks = sum(len(o.token_ids) for o in res)
            nudged[name] = sum(s == "nudger" for o in res for s in o.sources) / max(toks, 1)
    tokens = len(prompts) * max_tokens  # ignore_eos: every request writes max_tokens
    tok_s = {name: tokens / timing.median(ts) for name, ts in times.items()}
    same = all(outs[n] == outs["k=0"] for n in outs if n != "base")
    return tok_s, dict(nudged=nudged.get("default"), same_output=same, times=times)


def paired_ratio(times: dict, name: str, other: str) -> float:
    """Median over repeats of other's time / name's time in the same repeat (the two ran close together,
    under the same load): speed of `name` over `other`, robust to load that drifts between repeats."""
    return timing.median([o / t for t, o in zip(times[name], times[other])])


def main(argv=None) -> int:
    args = parse_args(argv)
    device, dtype, models = report.resolve_common(args)
    log = timing.Log(args.time_budget)
    env = hardware.environment(device)
    log(f"draft sweep on {env['device']}, models {models}, commit {env['commit']}{' (dirty)' if env['dirty'] else ''}")
    kind = "tiny" if models == "tiny" else "real"
    agreement = args.agreement if args.agreement is not None else workload.DEFAULT_AGREEMENT[kind]
    pair = pairs.make_pair(models, agreement, device, dtype, shrink=args.shrink, seed=args.seed,
                            work_dir=Path(args.work_dir) if args.work_dir else None, log=log)
    from nudge_engine.engine import NudgeEngine
    batches = [int(b) for b in args.batches.split(",")]
    ks = tuple(int(k) for k in args.ks.split(","))
    kv = 256 << 20 if device.type == "cpu" else 4 << 30
    engines = {w: NudgeEngine(pair.base, pair.nudger if w == "pair" else None, device=device, dtype=dtype,
                              kv_cache_bytes=kv, max_num_seqs=max(batches)) for w in ("base", "pair")}
    prompts_all = workload.make_prompts(engines["pair"].tokenizer, [args.prompt_len] * max(batches + [8, args.serial_prompts]),
                                      seed=args.seed)
    if args.gamma == "auto":
        gamma, tried = workload.calibrate_gamma(engines["pair"], prompts_all[:8], args.max_tokens, args.target_nudged, 8)
        log(f"gamma {gamma} nudges ~{dict(tried)[gamma]:.1%} (target {args.target_nudged:.0%})")
    else:
        gamma = float(args.gamma)
    cfgs = configs(ks, gamma)
    rows = []
    for b in batches:
        serial = b == 1 and args.serial_prompts > 1
        prompts = prompts_all[:args.serial_prompts] if serial else prompts_all[:b]
        tok_s, info = sweep_batch(engines, prompts, args.max_tokens, cfgs, args.repeats, log, serial)
        best_name = max((f"k={k}" for k in ks), key=lambda n: tok_s[n])
        row = dict(batch=b, **{n: tok_s[n] for n, _, _ in cfgs}, best_fixed=best_name,
                   default_over_best=tok_s["default"] / tok_s[best_name],
                   default_over_base=tok_s["default"] / tok_s["base"], k0_over_base=tok_s["k=0"] / tok_s["base"],
                   default_over_best_paired=paired_ratio(info["times"], "default", best_name),
                   nudged=info["nudged"], same_output=info["same_output"], times_s=info["times"])
        rows.append(row)
        log(f"batch {b:3d}: " + "  ".join(f"{n} {tok_s[n]:7.1f}" for n, _, _ in cfgs)
            + f"  tok/s | default/best({best_name}) {row['default_over_best']:.3f}"
            + f" (paired {row['default_over_best_paired']:.3f})  default/base {row['default_over_base']:.2f}  nudged {info['nudged']:.1%}  same output {info['same_output']}")
    data = dict(suite=args.suite, env=env, models=models, gamma=gamma, ks=ks, repeats=args.repeats,
                max_tokens=args.max_tokens, prompt_len=args.prompt_len, serial_prompts=args.serial_prompts, rows=rows, log=log.lines)
    md = to_markdown(data, [n for n, _, _ in cfgs])
    print(md)
    json_path, md_path = report.write_results(args.out, device, args.suite, models, data, md)
    log(f"wrote {json_path} and {md_path}")
    worst = min(r["default_over_best"] for r in rows)
    return 0 if all(r["same_output"] for r in rows) and worst > 0 else 1


def to_markdown(data: dict, names: list[str]) -> str:
    env = data["env"]
    cols = [("batch", "batch")] + [(n, f"{n} tok/s") for n in names] + [
        ("best_fixed", "best fixed"), ("default_over_best", "default / best"),
        ("default_over_best_paired", "default / best, paired"),
        ("default_over_base", "default / base"), ("k0_over_base", "k=0 / base"), ("nudged", "nudged"),
        ("same_output", "same output")]
    head = (f"# Draft policy sweep ({data['suite']})\n\n{env['device']}, commit {env['commit']}, models {data['models']}, "
            f"gamma {data['gamma']}, {data['prompt_len']}-token prompts, {data['max_tokens']} tokens, greedy; batch 1 runs "
            f"{data['serial_prompts']} prompts one after another; "
            f"{data['repeats']} interleaved repeats, medians. tok/s = tokens / median time; paired = median over repeats "
            f"of the best fixed k's time over the default's in the same repeat.\n\n")
    return head + report.markdown_table(data["rows"], cols, digits=3)


if __name__ == "__main__":
    sys.exit(main())
