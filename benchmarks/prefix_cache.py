"""Prefix caching: many requests that share a long few-shot prefix, caching on against off, in one run.

Every request is the same PREFIX (default 1,000 tokens cut from the shipped corpus) followed by its own
short question; all are submitted at once, greedy, a few output tokens each. For each setting (a fresh
engine each, same models, same prompts) the table gives:
  prefill tokens computed   prompt tokens the base model really ran (prompt tokens - prefix-cache hits;
                            the nudger row likewise for its own prompt copy)
  forward tokens            every token either model's forward computed (a spy on LoadedModel.forward)
  TTFT                      arrival to first token, median and p90 over the requests, and the wall time
  hit rate                  prefix-cache hit tokens / looked-up tokens, per model
and checks that both settings emit the same tokens. Requests admitted in the engine's first step find
nothing cached yet (their blocks register as they are computed); later ones hit.

    python -m benchmarks.prefix_cache --tiny             # CPU, tiny factory pair (~1 minute)
    python -m benchmarks.prefix_cache --device cuda --models tiny
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import hardware, pairs, report, timing, workload  # noqa: E402

SUITE = "prefix_cache"
MODELS = ("base", "nudger")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="prefix caching on vs off: shared few-shot prefix",
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    report.common_args(ap)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prefix-len", type=int, default=1000, help="tokens of the shared few-shot prefix")
    ap.add_argument("--suffix-len", type=int, default=24, help="tokens of each request's own question")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--max-num-batched-tokens", type=int, default=4096)
    ap.add_argument("--kv-cache-bytes", type=float, default=None,
                    help="both models together (default: enough for every request at once without caching)")
    ap.add_argument("--agreement", type=float, default=None)
    return ap.parse_args(argv)


def count_forward_tokens(engine) -> dict[str, int]:
    counts = {}
    for name, m in zip(MODELS, engine.models):
        counts[name] = 0

        def spy(seqs, num_new, rows=None, _f=m.forward, _name=name):
            counts[_name] += sum(num_new)
            return _f(seqs, num_new, rows)

        m.forward = spy
    return counts


def run_setting(pair, device, dtype, prompts, args, caching: bool, log) -> tuple[dict, list]:
    from nudge_engine.engine import NudgeEngine
    from nudge_engine.engine.sampling_params import SamplingParams
    kv_bytes = int(args.kv_cache_bytes) if args.kv_cache_bytes else None
    if kv_bytes is None:     # every request at once, uncached, with room to spare: no preemption either way
        per_token = sum(pairs.kv_bytes_per_token(f, dtype_of(dtype)) for f in (pair.base, pair.nudger))
        kv_bytes = int(per_token * len(prompts) * (len(prompts[0]) + args.max_tokens + 2 * args.block_size) * 1.1)
    engine = NudgeEngine(pair.base, pair.nudger, device=device, dtype=dtype, block_size=args.block_size,
                         kv_cache_bytes=kv_bytes, max_num_batched_tokens=args.max_num_batched_tokens,
                         max_num_seqs=max(len(prompts), 1), enable_prefix_caching=caching)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    engine.generate([[7, 8, 9, 10]], params)                     # warm-up: allocations, first kernels
    counts = count_forward_tokens(engine)
    before = {n: (m.pool.prefix_cache_hit_tokens, m.pool.prefix_cache_query_tokens) for n, m in zip(MODELS, engine.models)}
    hardware.sync(device)
    t0 = time.perf_counter()
    outs = engine.generate(prompts, params)
    hardware.sync(device)
    wall = time.perf_counter() - t0
    ttft = [o.first_token_time - o.arrival_time for o in outs]
    row = dict(setting="on" if caching else "off", requests=len(prompts), prompt_tokens=sum(len(p) for p in prompts),
               wall_s=wall, ttft_median_s=timing.median(ttft), ttft_p90_s=timing.percentile(ttft, 90),
               preemptions=engine.stats.preemptions, kv_blocks=engine.base.pool.num_blocks)
    for name, m in zip(MODELS, engine.models):
        hits = m.pool.prefix_cache_hit_tokens - before[name][0]
        queries = m.pool.prefix_cache_query_tokens - before[name][1]
        row[f"{name}_hit_tokens"] = hits
        row[f"{name}_hit_rate"] = hits / queries if queries else 0.0
        row[f"{name}_forward_tokens"] = counts[name]
    # The base computes every prompt token it did not find cached (the nudger reads its prompt lazily, so its
    # count is its forward tokens minus its drafts; the table gives its forward tokens).
    row["base_prefill_computed"] = row["prompt_tokens"] - row["base_hit_tokens"]
    log(f"caching {row['setting']}: {row['base_prefill_computed']} base prefill tokens computed, "
        f"TTFT median {row['ttft_median_s'] * 1e3:.0f} ms, wall {wall:.2f} s, hit rate base "
        f"{row['base_hit_rate']:.3f} nudger {row['nudger_hit_rate']:.3f}")
    return row, [o.token_ids for o in outs]


def tiny_long_pair(agreement: float, context: int) -> pairs.Pair:
    """The benchmarks' tiny pair (pairs.TINY_BASE shapes) with a context long enough for the prefix."""
    import tempfile
    from nudge_engine.testing import make_tiny_pair
    folder = Path(tempfile.mkdtemp(prefix="nudge-bench-prefix-"))
    positions = max(512, 1 << (context - 1).bit_length())
    base, nudger = make_tiny_pair(folder, "llama", "llama", "bytelevel", agreement,
                                  nudger_overrides={"num_layers": pairs.TINY_NUDGER_LAYERS},
                                  max_position_embeddings=positions, **pairs.TINY_BASE)
    return pairs.Pair("tiny", base, nudger, "llama", agreement, 0.0, str(folder),
                       [f"tiny factory pair {pairs.TINY_BASE}, context {positions}"])


def dtype_of(name: str):
    from nudge_engine.model.loader import resolve_dtype
    return resolve_dtype(name)


def make_prompts(tokenizer, args) -> list[list[int]]:
    prefix = workload.make_prompts(tokenizer, [args.prefix_len], seed=1)[0]
    suffixes = workload.make_prompts(tokenizer, [args.suffix_len] * args.requests, seed=2)
    return [prefix + s for s in suffixes]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.requests, args.prefix_len = min(args.requests, 16), min(args.prefix_len, 500)
    device, dtype, models = report.resolve_common(args)
    log = timing.Log(args.time_budget)
    env = hardware.environment(device)
    agreement = args.agreement if args.agreement is not None else workload.DEFAULT_AGREEMENT[
        "tiny" if models == "tiny" else "real"]
    if models == "tiny":
        pair = tiny_long_pair(agreement, args.prefix_len + args.suffix_len + args.max_tokens)
    else:
        pair = pairs.make_pair(models, agreement, device, dtype, shrink=args.shrink,
                                work_dir=Path(args.work_dir) if args.work_dir else None, log=log)
    from nudge_engine.model.tokenizer import Tokenizer
    prompts = make_prompts(Tokenizer(pair.base), args)
    rows, outputs = [], []
    for caching in (False, True):
        row, out = run_setting(pair, device, dtype, prompts, args, caching, log)
        rows.append(row)
        outputs.append(out)
    off, on = rows
    same = outputs[0] == outputs[1]
    summary = dict(prefill_saved=1 - on["base_prefill_computed"] / off["base_prefill_computed"],
                   ttft_median_speedup=off["ttft_median_s"] / on["ttft_median_s"],
                   wall_speedup=off["wall_s"] / on["wall_s"], same_outputs=same)
    log(f"prefill computed {on['base_prefill_computed']} vs {off['base_prefill_computed']} "
        f"({summary['prefill_saved']:.1%} saved), TTFT median x{summary['ttft_median_speedup']:.2f}, "
        f"wall x{summary['wall_speedup']:.2f}, same outputs: {same}")
    columns = [("setting", "prefix caching"), ("base_prefill_computed", "base prefill tokens computed"),
               ("base_forward_tokens", "base forward tokens"), ("nudger_forward_tokens", "nudger forward tokens"),
               ("base_hit_rate", "hit rate base"), ("nudger_hit_rate", "hit rate nudger"),
               ("ttft_median_s", "TTFT median s"), ("ttft_p90_s", "TTFT p90 s"), ("wall_s", "wall s"),
               ("preemptions", "preemptions")]
    md = "\n".join([
        f"# Prefix caching: {args.requests} requests sharing a {args.prefix_len}-token prefix "
        f"(+{args.suffix_len} own tokens, {args.max_tokens} output tokens, greedy)",
        "", f"{hardware.device_name(device)}, {dtype}, pair {pair.name}, block size {args.block_size}, "
        f"max_num_batched_tokens {args.max_num_batched_tokens}, commit {env.get('commit')}", "",
        report.markdown_table(rows, columns, digits=3), "",
        f"Prefill saved {summary['prefill_saved']:.1%}; TTFT median x{summary['ttft_median_speedup']:.2f}; "
        f"wall x{summary['wall_speedup']:.2f}; identical outputs on and off: {same}.",
        "", "Command: `python -m benchmarks.prefix_cache " + " ".join(argv or sys.argv[1:]) + "`"])
    data = dict(env=env, args=vars(args), pair=dict(name=pair.name, base=pair.base, nudger=pair.nudger),
                rows=rows, summary=summary, log=log.lines)
    json_path, md_path = report.write_results(args.out, device, SUITE, models, data, md)
    print(md)
    print(f"wrote {json_path} and {md_path}")
    if models == "tiny":
        pairs.remove_pair(pair)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
