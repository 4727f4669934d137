"""Latency: batch 1, greedy, fixed prompts and output length; every row on the same models, same run.

Rows
  (a) engine, base alone            NudgeEngine(base)
  (b) engine, nudging, k = 0, 2, 4, 8 (k = 0: plain base decoding, nudger caught up lazily)
  (c) transformers greedy generate, base alone (KV cache, no stop at end tokens)
  (d) the authors' notebook nudging, re-implemented (benchmarks/notebook_nudging.py): same models, same gamma
  (e) engine, nudger alone
  (g) engine, base alone and nudging (the default), eager against graphs (CUDA graphs on a GPU, by
      default there; the CPU's replay emulation with --graph-rows on), same tokens
Each row: tokens/s over the whole request (prefill included), time per output token after the
first (TPOT), time to first token, for nudging rows the nudged fraction and accepted draft tokens
per round, and ratios against (a) and (d). On a GPU also the physical limit: bytes one output
token must move (weights + KV read, from the forward passes each row really ran) over the
device-to-device copy bandwidth measured in this run.

gamma: `auto` (default) bisects gamma so that about 9% of the tokens are nudged on these prompts,
the paper's regime; the value found is reported.

Agreement sweep: the pair's agreement knob (see benchmarks/pairs.py) is moved in place on the
loaded models; for each value: nudged fraction, draft acceptance, tokens/s of nudging (k=0, k=4)
and of the base alone and the notebook, at gamma 0.4 and at the gamma that nudges ~9%.

    python -m benchmarks.latency --tiny [--quick]                  # CPU, tiny factory pair, < 2 minutes
    python3 -m benchmarks.latency [--quick] [--models llama3-8b]   # GPU: OLMo-2-7B + 1B shapes
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import draft_compare, hardware, pairs, report, timing, workload  # noqa: E402
from benchmarks.notebook_nudging import NotebookNudging, eos_ids_of, word_start_table  # noqa: E402

SUITE = "latency"

# runs per prompt (best counts), prompts, prompt length, output tokens, draft ks, sweep agreements, ...
SIZES = {
    ("tiny", False): dict(repeats=2, prompts=3, prompt_len=32, max_tokens=64, ks=(1, 2, 4, 8),
                          agreements=(0.4, 0.6, 0.8, 0.9, 0.95), sweep_prompts=2, sweep_tokens=48, calib_tokens=48,
                          calib_iters=6),
    ("tiny", True): dict(repeats=1, prompts=2, prompt_len=24, max_tokens=32, ks=(2, 4, 8), agreements=(0.9,),
                         sweep_prompts=1, sweep_tokens=32, calib_tokens=32, calib_iters=5),
    ("real", False): dict(repeats=1, prompts=2, prompt_len=128, max_tokens=128, ks=(2, 4, 8),
                          agreements=(0.95, 0.98, 0.99), sweep_prompts=2, sweep_tokens=64, calib_tokens=64,
                          calib_iters=5),
    ("real", True): dict(repeats=1, prompts=2, prompt_len=128, max_tokens=64, ks=(2, 4, 8), agreements=(0.95, 0.99),
                         sweep_prompts=2, sweep_tokens=48, calib_tokens=48, calib_iters=4),
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="batch-1 latency: engine, transformers and notebook nudging",
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    report.common_args(ap)
    ap.add_argument("--gamma", default="auto", help="a number, or auto: nudge ~--target-nudged of the tokens")
    ap.add_argument("--target-nudged", type=float, default=pairs.PAPER_NUDGED_FRACTION)
    ap.add_argument("--agreement", type=float, default=None, help="the pair's agreement knob")
    ap.add_argument("--ks", default=None, help="draft tokens per round for the nudging rows, e.g. 2,4,8")
    ap.add_argument("--prompts", type=int, default=None)
    ap.add_argument("--prompt-len", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--sweep", default=None, help="agreement values, comma separated, or 'none'")
    ap.add_argument("--sweep-notebook", choices=("on", "off"), default=None,
                    help="time the notebook in the sweep too (default: on on a CPU, off on a GPU)")
    ap.add_argument("--kv-cache-bytes", type=float, default=None, help="per engine (default 256 MiB CPU, 2 GiB GPU)")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers rows (c) and (d)")
    ap.add_argument("--graph-rows", choices=("auto", "on", "off"), default="auto",
                    help="(g) rows, eager against graphs (auto: on a GPU)")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


# --------------------------------------------------------------------------- measuring
class Bench:
    def __init__(self, args, device, dtype, pair, log):
        self.args, self.device, self.dtype, self.pair, self.log = args, device, dtype, pair, log
        self.torch_dtype = getattr(torch, dtype)
        self.copy_gbps = float("nan")
        self.read_bytes = {}   # folder -> weight bytes one forward reads (embedding rows aside)
        self.kvb = {}          # folder -> KV bytes per token
        for f in (pair.base, pair.nudger):
            cfg = json.loads((f / "config.json").read_text())
            embed = cfg["vocab_size"] * cfg["hidden_size"] * self.elt
            self.read_bytes[f] = pairs.weight_bytes(f) - (0 if cfg.get("tie_word_embeddings") else embed)
            self.kvb[f] = pairs.kv_bytes_per_token(f, self.torch_dtype)

    @property
    def elt(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()

    def engine(self, base, nudger=None, enforce_eager=None):
        from nudge_engine.engine import NudgeEngine
        kv = self.args.kv_cache_bytes
        kv = int(kv) if kv else (2 << 30 if self.device.type == "cuda" else 256 << 20)
        t0 = time.perf_counter()
        eng = NudgeEngine(base, nudger, device=self.device, dtype=self.dtype, kv_cache_bytes=kv, max_num_seqs=8,
                          enforce_eager=enforce_eager)
        self.log(f"loaded engine ({'base + nudger' if nudger else Path(base).name}) in {time.perf_counter() - t0:.1f}s, "
                 f"attention backend {eng.base.runner.backend.name}")
        return eng

    def run_engine(self, eng, prompts, max_tokens, nudge=None, counter=None, warm=True,
                   repeats: int = 1) -> tuple[dict, list]:
        """Each prompt `repeats` times; the fastest run of each prompt counts (a shared CPU is noisy)."""
        from nudge_engine.engine.sampling_params import SamplingParams
        sp = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        if warm:
            eng.generate([prompts[0]], SamplingParams(max_tokens=min(16, max_tokens), temperature=0,
                                                      ignore_eos=True), nudge)
        if counter:
            counter.reset()
        outs, total = [], 0.0
        for p in prompts:
            best = None
            for _ in range(repeats):
                if counter:
                    before = counter.snapshot()
                hardware.sync(self.device)
                t0 = time.perf_counter()
                out = eng.generate([p], sp, nudge)[0]
                hardware.sync(self.device)
                dt = time.perf_counter() - t0
                if best is None or dt < best[0]:
                    best = (dt, out)
            if counter:  # count one run per prompt
                after = counter.snapshot()
                for c, x, y in zip(counter.counts, before, after):
                    for key in c:
                        c[key] -= (y[key] - x[key]) * (repeats - 1)
            total += best[0]
            outs.append(best[1])
        tokens = sum(len(o.token_ids) for o in outs)
        nudging = eng.nudger is not None
        rounds = sum(o.rounds for o in outs)
        drafted = sum(o.drafted_tokens for o in outs)
        accepted = sum(o.accepted_tokens for o in outs)
        row = dict(tokens=tokens, seconds=total, tok_s=tokens / total,
                   tpot_ms=1e3 * timing.median([(o.finish_time - o.first_token_time) / max(len(o.token_ids) - 1, 1)
                                                for o in outs]),
                   ttft_ms=1e3 * timing.median([o.first_token_time - o.arrival_time for o in outs]),
                   nudged=sum(s == "nudger" for o in outs for s in o.sources) / max(tokens, 1),
                   rounds=rounds, drafted=drafted, accepted=accepted,
                   acc_per_round=accepted / rounds if rounds and nudging else None,
                   acceptance=accepted / drafted if drafted else None)
        if counter:
            fw = counter.snapshot()
            models = [m.path for m in eng.models]
            moved = sum(c["calls"] * self.read_bytes[m] + c["kv_tokens"] * self.kvb[m] for c, m in zip(fw, models))
            row.update(forwards=[c["calls"] for c in fw], bytes_per_token=moved / max(tokens, 1))
        return row, outs

    def run_hf_generate(self, model, prompts, max_tokens, repeats: int = 1) -> dict:
        cfg = workload.hf_no_eos(model)
        dev = self.device

        def gen(p, n):
            x = torch.tensor([p], device=dev)
            hardware.sync(dev)
            t0 = time.perf_counter()
            with torch.no_grad():
                out = model.generate(x, attention_mask=torch.ones_like(x), generation_config=cfg,
                                     max_new_tokens=n, min_new_tokens=n)
            hardware.sync(dev)
            return time.perf_counter() - t0, out.shape[1] - x.shape[1]

        gen(prompts[0], min(16, max_tokens))
        full, first, tokens = [], [], 0
        for p in prompts:
            runs = [gen(p, max_tokens) for _ in range(repeats)]
            full.append(min(t for t, _ in runs))
            tokens += runs[0][1]
            first.append(min(gen(p, 1)[0] for _ in range(repeats)))
        total = sum(full)
        L = len(prompts[0])
        kv_read = max_tokens * L + max_tokens * (max_tokens - 1) / 2
        moved = max_tokens * self.read_bytes[self.pair.base] + kv_read * self.kvb[self.pair.base]
        return dict(tokens=tokens, seconds=total, tok_s=tokens / total, ttft_ms=1e3 * timing.median(first),
                    tpot_ms=1e3 * timing.median([(f - t1) / max(max_tokens - 1, 1) for f, t1 in zip(full, first)]),
                    forwards=[max_tokens], bytes_per_token=moved / max_tokens)

    def run_notebook(self, nb: NotebookNudging, prompts, max_tokens, gamma, repeats: int = 1) -> tuple[dict, list]:
        nb.generate(prompts[0], prompts[0], min(16, max_tokens), gamma, ignore_eos=True)
        outs = []
        for p in prompts:
            hardware.sync(self.device)
            runs = [nb.generate(p, p, max_tokens, gamma, ignore_eos=True) for _ in range(repeats)]
            outs.append(min(runs, key=lambda o: o.finish_time - o.start_time))
        tokens = sum(len(o.token_ids) for o in outs)
        total = sum(o.finish_time - o.start_time for o in outs)
        L = len(prompts[0])
        moved = 0.0
        for o in outs:
            for folder, calls in ((self.pair.base, o.base_forwards), (self.pair.nudger, o.nudger_forwards)):
                moved += calls * self.read_bytes[folder] + (calls * L + calls * (calls - 1) / 2) * self.kvb[folder]
        row = dict(tokens=tokens, seconds=total, tok_s=tokens / total,
                   ttft_ms=1e3 * timing.median([o.first_token_time - o.start_time for o in outs]),
                   tpot_ms=1e3 * timing.median([(o.finish_time - o.first_token_time) / max(len(o.token_ids) - 1, 1)
                                                for o in outs]),
                   nudged=sum(s == "nudger" for o in outs for s in o.sources) / max(tokens, 1),
                   forwards=[sum(o.base_forwards for o in outs), sum(o.nudger_forwards for o in outs)],
                   bytes_per_token=moved / max(tokens, 1))
        return row, outs

    def calibrate_gamma(self, eng, prompts, max_tokens, target, iters=7) -> tuple[float, list]:
        return workload.calibrate_gamma(eng, prompts, max_tokens, target, iters)


def add_limits(rows: list[dict], copy_gbps: float, base_limit_tok_s: float) -> None:
    for r in rows:
        bpt = r.get("bytes_per_token")
        if bpt and copy_gbps == copy_gbps:
            r["limit_tok_s"] = copy_gbps * 1e9 / bpt
            r["frac_limit"] = r["tok_s"] / r["limit_tok_s"]
            r["vs_base_limit"] = r["tok_s"] / base_limit_tok_s


# --------------------------------------------------------------------------- the suite
def main(argv=None) -> int:
    args = parse_args(argv)
    device, dtype, models = report.resolve_common(args)
    kind = "tiny" if models == "tiny" else "real"
    size = dict(SIZES[(kind, args.quick)])
    for key in ("prompts", "prompt_len", "max_tokens"):
        if getattr(args, key) is not None:
            size[key] = getattr(args, key)
    if args.ks:
        size["ks"] = tuple(int(k) for k in args.ks.split(","))
    if args.sweep:
        size["agreements"] = () if args.sweep == "none" else tuple(float(a) for a in args.sweep.split(","))
    agreement = args.agreement if args.agreement is not None else workload.DEFAULT_AGREEMENT[kind]
    sweep_notebook = (args.sweep_notebook or ("off" if device.type == "cuda" else "on")) == "on" and not args.no_hf
    log = timing.Log(args.time_budget)
    env = hardware.environment(device)
    log(f"latency suite on {env['device']}, models {models}, dtype {dtype}, commit {env['commit']}"
        f"{' (dirty)' if env['dirty'] else ''}")
    workload.quiet_transformers()

    pair = pairs.make_pair(models, agreement, device, dtype, shrink=args.shrink, seed=args.seed,
                            work_dir=Path(args.work_dir) if args.work_dir else None, log=log)
    log(f"pair ready ({pair.where})")
    b = Bench(args, device, dtype, pair, log)
    if device.type == "cuda":
        b.copy_gbps = hardware.copy_bandwidth_gbps(device)
        log(f"device-to-device copy bandwidth: {b.copy_gbps:.0f} GB/s (read + write)")

    from nudge_engine.engine import DEFAULT_DRAFT_TOKENS
    from nudge_engine.engine.sampling_params import NudgeParams
    eng_pair = b.engine(pair.base, pair.nudger)
    prompts = workload.make_prompts(eng_pair.tokenizer, [size["prompt_len"]] * size["prompts"], seed=args.seed)
    N, R = size["max_tokens"], size["repeats"]
    calibration = []
    if args.gamma == "auto":
        gamma, calibration = b.calibrate_gamma(eng_pair, prompts, size["calib_tokens"], args.target_nudged)
        log(f"gamma {gamma} nudges ~{dict(calibration)[gamma]:.1%} (target {args.target_nudged:.0%}; tried "
            + ", ".join(f"{g}:{f:.1%}" for g, f in calibration) + ")")
    else:
        gamma = float(args.gamma)

    rows: list[dict] = []

    def add(label, engine_name, k, row, **extra):
        row = dict(row, label=label, engine=engine_name, k=k, **extra)
        rows.append(row)
        log(f"{label:38s} {row['tok_s']:8.1f} tok/s  tpot {row['tpot_ms']:7.2f} ms"
            + (f"  nudged {row['nudged']:.1%}" if row.get("nudged") is not None and label[:3] in ("(b)", "(d)", "(f)", "(g)") else ""))
        return row

    # (a) and (b): both engines stay loaded for the sweep at the end
    counter = workload.ForwardCounter(eng_pair)
    eng_base = b.engine(pair.base)
    base_counter = workload.ForwardCounter(eng_base)
    row_a, _ = b.run_engine(eng_base, prompts, N, counter=base_counter, repeats=R)
    row_a.pop("nudged", None)
    row_a = add("(a) engine, base alone", "engine", None, row_a, gamma=None)
    engine_outs = {}
    for k in (0, *size["ks"]):
        nudge = NudgeParams(gamma=gamma, draft_tokens=k, adaptive_drafting=False)
        r, outs = b.run_engine(eng_pair, prompts, N, nudge, counter, repeats=R)
        engine_outs[k] = outs
        add(f"(b) engine, nudging, k={k}", "engine", k, r, gamma=gamma)
    # The engine's default: up to DEFAULT_DRAFT_TOKENS drafts, fewer where they do not pay.
    k_max = DEFAULT_DRAFT_TOKENS
    r, outs = b.run_engine(eng_pair, prompts, N, NudgeParams(gamma=gamma, draft_tokens=k_max, adaptive_drafting=True),
                           counter, repeats=R)
    engine_outs[f"auto{k_max}"] = outs
    add(f"(b) engine, nudging, adaptive k<={k_max} (default)", "engine", f"<={k_max}", r, gamma=gamma)
    same_output = all([o.token_ids for o in engine_outs[k]] == [o.token_ids for o in engine_outs[0]]
                      for k in engine_outs)
    log(f"nudged outputs identical for every k: {same_output}")
    default_vs_k = draft_compare.compare(rows, "engine", lambda r: str(r.get("k", "")).startswith("<="),
                                         lambda r: r.get("k") if r["label"].startswith("(b)") else None)
    for s in default_vs_k:
        log(f"default {s['default_tok_s']:.1f} tok/s, best fixed k={s['best_k']} {s['best_tok_s']:.1f}: "
            f"{s['vs_best_k']:.3f}")
    counter.close()
    base_counter.close()

    # (c) and (d): transformers, the same folders
    hf_models = None
    if not args.no_hf:
        hf_models = (workload.load_hf(pair.base, device, b.torch_dtype), workload.load_hf(pair.nudger, device, b.torch_dtype))
        add("(c) transformers generate, base alone", "transformers", None, b.run_hf_generate(hf_models[0], prompts, N, R),
            gamma=None)
        nb = notebook_for(hf_models, pair)
        row_d, nb_outs = b.run_notebook(nb, prompts, N, gamma, R)
        ref = engine_outs[size["ks"][-1] if size["ks"] else 0]
        matches = sum(x.token_ids == e.token_ids for x, e in zip(nb_outs, ref))
        add("(d) notebook nudging (HF, cached)", "notebook", "-", row_d, gamma=gamma,
            equals_engine=f"{matches}/{len(prompts)}")
        log(f"notebook output equals the engine's on {matches}/{len(prompts)} prompts")

    # (e): the nudger alone
    eng_nudger = b.engine(pair.nudger)
    nudger_counter = workload.ForwardCounter(eng_nudger)
    row_e, _ = b.run_engine(eng_nudger, prompts, N, counter=nudger_counter, repeats=R)
    row_e.pop("nudged", None)
    add("(e) engine, nudger alone", "engine", None, row_e, gamma=None)
    nudger_counter.close()
    del eng_nudger, nudger_counter
    hardware.free_memory(device)

    graphs_same_output = None
    if args.graph_rows == "on" or (args.graph_rows == "auto" and device.type == "cuda"):
        graphs_same_output = graph_rows(b, pair, prompts, N, R, gamma, add)
        log(f"eager and graph outputs identical: {graphs_same_output}")

    # (f): cross-tokenizer nudging (NUDGING.md section 7) beside the token path, on the same base and
    # a nudger of the same shape whose tokenizer is `▁`-style: text prompts, the engine picks the text path.
    if kind == "tiny":
        cross_dir = Path(pair.where) / "cross-nudger"
        eng_cross = b.engine(pair.base, pairs.tiny_cross_nudger(cross_dir, args.seed))
        text_prompts = [eng_pair.tokenizer.decode(p) for p in prompts]
        for k in (0, DEFAULT_DRAFT_TOKENS):
            r, outs = b.run_engine(eng_cross, text_prompts, N, NudgeParams(gamma=gamma, draft_tokens=k), repeats=R)
            work = [w for o in outs for w in o.work]
            add(f"(f) engine, cross-tokenizer nudging, k={k}", "engine-cross", k, r, gamma=gamma,
                reads=len(work), converted_per_read=(
                    sum(w.converted_tokens for w in work) / len(work) if work else None))
        del eng_cross
        hardware.free_memory(device)

    # Agreement sweep: the knob moves in place on the loaded engines (and the notebook's models).
    sweep = []
    if size["agreements"]:
        mods = pairs.engine_modules(eng_pair) + pairs.engine_modules(eng_base)
        nb_sweep = None
        if hf_models and sweep_notebook:
            mods += list(hf_models)
            nb_sweep = notebook_for(hf_models, pair)
        knob = pairs.AgreementKnob(pair.family, pair.agreement, mods)
        sp = workload.make_prompts(eng_pair.tokenizer, [size["prompt_len"]] * size["sweep_prompts"], seed=args.seed + 7)
        ST = size["sweep_tokens"]
        cell_s = None
        for a in size["agreements"]:
            if cell_s is not None and log.left() < 1.5 * cell_s + 30:
                log.skip(f"sweep point agreement {a}")
                continue
            t_cell = time.perf_counter()
            knob.set(a)
            base_row, _ = b.run_engine(eng_base, sp, ST)
            g_cal, _tried = b.calibrate_gamma(eng_pair, sp, size["calib_tokens"], args.target_nudged,
                                              iters=size["calib_iters"])
            for g, regime in ((pairs.PAPER_GAMMA, "gamma 0.4"), (g_cal, f"~{args.target_nudged:.0%} nudged")):
                r0, o0 = b.run_engine(eng_pair, sp, ST, NudgeParams(gamma=g, draft_tokens=0))
                r4, o4 = b.run_engine(eng_pair, sp, ST, NudgeParams(gamma=g, draft_tokens=4, adaptive_drafting=False))
                ra, _ = b.run_engine(eng_pair, sp, ST, NudgeParams(gamma=g, draft_tokens=4, adaptive_drafting=True))
                entry = dict(agreement=a, gamma=g, regime=regime, nudged=r4["nudged"], acceptance=r4["acceptance"],
                             acc_per_round=r4["acc_per_round"], base_tok_s=base_row["tok_s"], k0_tok_s=r0["tok_s"],
                             k4_tok_s=r4["tok_s"], k0_vs_base=r0["tok_s"] / base_row["tok_s"],
                             k4_vs_base=r4["tok_s"] / base_row["tok_s"], auto_tok_s=ra["tok_s"],
                             auto_vs_base=ra["tok_s"] / base_row["tok_s"],
                             same_output=[o.token_ids for o in o0] == [o.token_ids for o in o4])
                if nb_sweep is not None:
                    rn, on = b.run_notebook(nb_sweep, sp, ST, g)
                    entry["notebook_tok_s"] = rn["tok_s"]
                    entry["notebook_vs_base"] = rn["tok_s"] / base_row["tok_s"]
                    entry["notebook_equal"] = [o.token_ids for o in on] == [o.token_ids for o in o4]
                sweep.append(entry)
                log(f"sweep agreement {a:.3f} gamma {g:.3f}: nudged {entry['nudged']:.1%}, acceptance "
                    f"{entry['acceptance']:.1%}, base {entry['base_tok_s']:.1f}, k=0 {entry['k0_tok_s']:.1f}, "
                    f"k=4 {entry['k4_tok_s']:.1f} tok/s"
                    + (f", notebook {entry['notebook_tok_s']:.1f}" if "notebook_tok_s" in entry else ""))
            cell_s = time.perf_counter() - t_cell
        knob.set(pair.agreement)
        del knob
    del eng_pair, eng_base, hf_models
    hardware.free_memory(device)

    row_d = next((r for r in rows if r["label"].startswith("(d)")), None)
    for r in rows:
        r["vs_a"] = r["tok_s"] / row_a["tok_s"]
        r["vs_d"] = r["tok_s"] / row_d["tok_s"] if row_d else None
    avg_ctx = size["prompt_len"] + N / 2
    base_limit = b.copy_gbps * 1e9 / (b.read_bytes[pair.base] + avg_ctx * b.kvb[pair.base])
    add_limits(rows, b.copy_gbps, base_limit)

    data = dict(suite=SUITE, env=env, args=vars(args), sizes=size, pair=pair.describe(), gamma=gamma,
                gamma_calibration=calibration, target_nudged=args.target_nudged, copy_gbps=b.copy_gbps,
                base_limit_tok_s=base_limit, nudged_outputs_identical_for_every_k=same_output, rows=rows,
                sweep=sweep, skipped=log.skipped, log=log.lines, default_vs_k=default_vs_k,
                graphs_same_output=graphs_same_output)
    md = to_markdown(data)
    print()
    print(md)
    json_path, md_path = report.write_results(args.out, device, SUITE, models if args.shrink == 1 else pair.name,
                                              data, md)
    print(f"\nwrote {json_path} and {md_path}")
    if not args.no_plot and sweep:
        from benchmarks import plot
        print(f"wrote {plot.plot_latency(data, json_path.with_suffix('.png'))}")
    if args.work_dir is None:
        pairs.remove_pair(pair)
    log("done")
    return 0


def graph_rows(b: Bench, pair, prompts, max_tokens: int, repeats: int, gamma: float, add) -> bool:
    """(g): the base alone and nudging with the engine's default drafting, on fresh engines run eagerly
    and replaying graphs (the batch-1 decode and verify passes); returns whether the tokens agree."""
    from nudge_engine.engine.sampling_params import NudgeParams
    outs = {}
    for mode, eager in (("eager", True), ("graphs", False)):
        for who, nudger, nudge in (("base alone", None, None), ("nudging, default", pair.nudger, NudgeParams(gamma=gamma))):
            eng = b.engine(pair.base, nudger, enforce_eager=eager)
            row, out = b.run_engine(eng, prompts, max_tokens, nudge, repeats=repeats)
            if nudger is None:
                row.pop("nudged", None)
            outs[mode, who] = [o.token_ids for o in out]
            add(f"(g) engine, {who}, {mode}", "engine", "default" if nudger else None, row,
                gamma=gamma if nudger else None, graph_mode=eng.graph_mode)
            del eng
            hardware.free_memory(b.device)
    return all(outs["eager", who] == outs["graphs", who] for _, who in outs)


def notebook_for(hf_models, pair) -> NotebookNudging:
    size = max(m.config.vocab_size for m in hf_models)
    return NotebookNudging(hf_models[0], hf_models[1], word_start_table(pair.nudger, size),
                           eos_ids_of(hf_models[0]) | eos_ids_of(hf_models[1]))


ROW_COLUMNS = [("label", "row"), ("gamma", "gamma"), ("tok_s", "tok/s"), ("tpot_ms", "ms/token"),
               ("ttft_ms", "TTFT ms"), ("nudged", "nudged"), ("acc_per_round", "accepted/round"),
               ("acceptance", "acceptance"), ("vs_a", "vs (a)"), ("vs_d", "vs (d)")]
LIMIT_COLUMNS = [("bytes_per_token", "MB moved/token"), ("limit_tok_s", "limit tok/s"), ("frac_limit", "fraction of limit"),
                 ("vs_base_limit", "vs base-alone limit")]
SWEEP_COLUMNS = [("agreement", "agreement"), ("regime", "regime"), ("gamma", "gamma"), ("nudged", "nudged"),
                 ("acceptance", "acceptance k=4"), ("acc_per_round", "accepted/round k=4"),
                 ("base_tok_s", "base tok/s"), ("k0_tok_s", "k=0 tok/s"), ("k4_tok_s", "k=4 tok/s"),
                 ("auto_tok_s", "adaptive k<=4 tok/s"), ("notebook_tok_s", "notebook tok/s"),
                 ("k0_vs_base", "k=0 / base"), ("k4_vs_base", "k=4 / base"), ("auto_vs_base", "adaptive / base"),
                 ("notebook_vs_base", "notebook / base")]


def to_markdown(data: dict) -> str:
    env, size, pair = data["env"], data["sizes"], data["pair"]
    cal = dict(map(tuple, data["gamma_calibration"])) if data["gamma_calibration"] else {}
    lines = [f"# Latency, batch 1, greedy — {env['device']}", "",
             f"commit {env['commit']}{' (dirty tree)' if env['dirty'] else ''}, {env['date']}, torch {env['torch']}, "
             f"transformers {env.get('transformers')}" + (f", triton {env.get('triton')}" if env.get("triton") else ""),
             "",
             f"Models: {pair['name']} — base {pair['base_config']['architectures'][0]} "
             f"{pair['base_config']['params'] / 1e6:.1f}M params, nudger {pair['nudger_config']['architectures'][0]} "
             f"{pair['nudger_config']['params'] / 1e6:.1f}M params, {data['args']['dtype']}, agreement knob "
             f"{pair['agreement_written']}. {'; '.join(pair['notes'])}.",
             f"{size['prompts']} prompts of {size['prompt_len']} tokens, {size['max_tokens']} output tokens each "
             f"(end tokens ignored), best of {size['repeats']} run(s) per prompt; tok/s = all output tokens / all "
             f"request time (prefill included); ms/token = median time per output token after the first.",
             f"gamma = {data['gamma']}" + (f" (auto: nudges {cal.get(data['gamma'], float('nan')):.1%} on the "
                                          f"calibration run, target {data['target_nudged']:.0%})" if cal else "") +
             f"; nudged outputs identical for every k: {data['nudged_outputs_identical_for_every_k']}.", ""]
    cols = list(ROW_COLUMNS)
    if data["copy_gbps"] == data["copy_gbps"] and data["copy_gbps"]:
        cols += LIMIT_COLUMNS
        rows = [dict(r, bytes_per_token=r["bytes_per_token"] / 1e6 if r.get("bytes_per_token") else None)
                for r in data["rows"]]
    else:
        rows = data["rows"]
    rows = [dict(r, nudged=r.get("nudged") if r["label"][:3] in ("(b)", "(d)", "(f)", "(g)") else None) for r in rows]
    lines.append(report.markdown_table(rows, cols))
    lines += draft_compare.lines(data.get("default_vs_k", []), "engine")
    nb = next((r for r in data["rows"] if r["label"].startswith("(d)")), None)
    if nb:
        lines += ["", f"Notebook output equals the engine's (greedy, same gamma) on {nb['equals_engine']} prompts."]
    for r in data["rows"]:
        if r["label"].startswith("(f)") and r.get("reads"):
            lines += ["", f"{r['label']}: text path, same base, a nudger of the same shape with a `▁` tokenizer; "
                          f"{r['reads']} reads of the other model's text, {r['converted_per_read']:.1f} tokens "
                          f"converted per read (work per handoff follows the new text, not the prefix)."]
    if data["copy_gbps"] == data["copy_gbps"] and data["copy_gbps"]:
        lines += ["", f"Limit: device-to-device copy bandwidth {data['copy_gbps']:.0f} GB/s measured in this run "
                      f"(read + write). MB moved/token = (weights read per forward + KV read) summed over the forward "
                      f"passes each row ran, per output token; limit tok/s = bandwidth / that; base-alone limit "
                      f"(weights + KV of one base decode step) = {data['base_limit_tok_s']:.1f} tok/s."]
    else:
        lines += ["", "Limit columns: GPU only (no copy-bandwidth figure on a CPU run)."]
    if data["sweep"]:
        lines += ["", "## Agreement sweep", "",
                  f"Agreement knob moved in place on the loaded models; {size['sweep_prompts']} prompt(s) x "
                  f"{size['sweep_tokens']} tokens per cell. For each agreement: gamma 0.4, and the gamma that nudges "
                  f"~{data['target_nudged']:.0%} (the paper's regime). acceptance = accepted / drafted draft tokens at "
                  f"k=4.", "",
                  report.markdown_table(data["sweep"], SWEEP_COLUMNS)]
        eq = [s.get("notebook_equal") for s in data["sweep"] if "notebook_equal" in s]
        if eq:
            lines += ["", f"Notebook output equals the engine's in {sum(eq)}/{len(eq)} sweep cells."]
    if data.get("skipped"):
        lines += ["", "Skipped to stay within the time budget: " + "; ".join(data["skipped"]) + "."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
