"""Host syncs per engine round on the GPU (Triton backend), counted by torch.cuda.set_sync_debug_mode.

A round should make one small device-to-host copy (the handoff result); every other sync stalls
the CPU behind the GPU. Runs a tiny pair (greedy and nudged, drafts k = 0 / 4), counts the
"synchronizing operation" warnings each engine.step() raises, and writes a JSON report.

    python -m benchmarks.sync_report [--out FILE.json]
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import warnings

import torch

from nudge_engine.engine import NudgeEngine
from nudge_engine.engine.sampling_params import NudgeParams, SamplingParams
from nudge_engine.testing import make_tiny_pair


def count_round_syncs(engine: NudgeEngine, rounds: int) -> tuple[list[int], collections.Counter]:
    per_round, where = [], collections.Counter()
    draft_syncs = _spy_draft_loop()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        for _ in range(rounds):
            if not engine.has_unfinished():
                break
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                engine.step()
            syncs = [w for w in caught if "synchroniz" in str(w.message)]
            per_round.append(len(syncs))
            for w in syncs:
                where[f"{w.filename.rsplit('/', 1)[-1]}:{w.lineno}"] += 1
    finally:
        torch.cuda.set_sync_debug_mode("default")
        draft_syncs.restore()
    where["draft loop (must be 0)"] = draft_syncs.count
    return per_round, where


def _spy_draft_loop():
    """Counts the syncs raised inside the nudger's draft loop (pairing/device_drafts.py), which
    must have none: its picks and inputs stay on the device (issue 16)."""
    from nudge_engine.pairing import token

    real = token.draft_on_device

    class Spy:
        count = 0

        @staticmethod
        def restore():
            token.draft_on_device = real

    def spy(*args, **kwargs):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = real(*args, **kwargs)
        Spy.count += sum(1 for w in caught if "synchroniz" in str(w.message))
        for w in caught:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)  # still counted per round
        return out

    token.draft_on_device = spy
    return Spy


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=None)
    ap.add_argument("--rounds", type=int, default=12)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("sync report: no CUDA device, nothing to count")
        return 0
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        base, nudger = make_tiny_pair(f"{tmp}/pair", "llama", "llama", "bytelevel", agreement=0.6,
                                      hidden_size=128, num_heads=2, num_kv_heads=1)
        engine = NudgeEngine(base, nudger, device="cuda", attention_backend="triton", kv_cache_bytes=256 << 20)
        # fixed k = 4: every drafting round runs its passes after the first as one draft graph (model/draft_graph.py)
        for k, adaptive in ((0, True), (4, True), (4, False)):
            params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
            for n in range(4):
                engine.add_request([5 + i for i in range(8 + n)], params,
                                   NudgeParams(gamma=0.5, draft_tokens=k, adaptive_drafting=adaptive))
            engine.step()  # the first round compiles kernels and prefills: not a steady round
            per_round, where = count_round_syncs(engine, args.rounds)
            while engine.has_unfinished():
                engine.step()
            graphs = getattr(engine.nudger, "draft_graphs", None)
            report[f"draft_tokens={k}{'' if adaptive else ' fixed'}"] = {
                "syncs_per_round": per_round, "where": dict(where.most_common(10)),
                "draft_graph_replays": sum(graphs.replays.values()) if graphs else 0}
            print(f"draft_tokens={k}: host syncs per round {per_round}; top sites {where.most_common(5)}; "
                  f"in the draft loop {where['draft loop (must be 0)']}")
        assert engine.pools_all_free()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
