"""Plots of benchmark result files (matplotlib, Agg).

  latency     tokens/s against nudged fraction and against draft acceptance (the agreement sweep),
              one line per engine: engine nudging k=4, k=0, engine base alone, notebook nudging.
  throughput  output tokens/s against concurrent requests, one line per engine.

    python -m benchmarks.plot benchmarks/results/<file>.json [...]   # writes <file>.png beside each
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LATENCY_LINES = [("k4_tok_s", "engine, nudging k=4", "tab:green"), ("k0_tok_s", "engine, nudging k=0", "tab:blue"),
                 ("base_tok_s", "engine, base alone", "black"), ("notebook_tok_s", "notebook nudging (HF)", "tab:red")]
REGIME_MARKERS = {"gamma 0.4": "o"}


def _title(data: dict) -> str:
    env = data["env"]
    return f"{data['pair']['name']} on {env['device']} (commit {env['commit']})"


def plot_latency(data: dict, png: str | Path) -> Path:
    sweep = data["sweep"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    for ax, xkey, xlabel in ((axes[0], "nudged", "nudged fraction of output tokens"),
                             (axes[1], "acceptance", "draft acceptance at k=4 (accepted / drafted)")):
        for key, label, color in LATENCY_LINES:
            regimes = sorted({s["regime"] for s in sweep})
            for regime in regimes:  # one line per engine and regime, points sorted by x
                pts = sorted((s[xkey], s[key]) for s in sweep if s["regime"] == regime and s.get(key) is not None
                             and s.get(xkey) is not None and s[xkey] == s[xkey])
                if not pts:
                    continue
                marker = REGIME_MARKERS.get(regime, "s")
                ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color, marker=marker, lw=1.2, alpha=0.85,
                        ls="-" if marker == "o" else "--", label=label if regime == regimes[0] else None)
        if xkey == "nudged":
            ax.axvline(data.get("target_nudged", 0.09), color="grey", ls=":", lw=1)
            ax.text(data.get("target_nudged", 0.09), ax.get_ylim()[1] * 0.98, " paper ~9%", va="top", fontsize=8,
                    color="grey")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("output tokens/s (batch 1, greedy)")
    axes[0].legend(fontsize=8, loc="best")
    axes[1].text(0.01, 0.01, "o, solid: gamma 0.4   s, dashed: gamma for ~9% nudged\none point per agreement-knob value",
                 transform=axes[1].transAxes, fontsize=8, va="bottom")
    fig.suptitle("Latency vs nudging — " + _title(data), fontsize=10)
    fig.tight_layout()
    png = Path(png)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def plot_throughput(data: dict, png: str | Path) -> Path:
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    engines = []
    for r in data["rows"]:
        if r["engine"] not in engines:
            engines.append(r["engine"])
    for name in engines:
        pts = sorted((r["concurrency"], r["tok_s"]) for r in data["rows"] if r["engine"] == name and r.get("tok_s"))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent requests (offline, all submitted at once)")
    ax.set_ylabel("output tokens/s")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Throughput — " + _title(data), fontsize=10)
    fig.tight_layout()
    png = Path(png)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", help="result JSON files")
    args = ap.parse_args(argv)
    for f in args.files:
        data = json.loads(Path(f).read_text())
        fn = {"latency": plot_latency, "throughput": plot_throughput}.get(data.get("suite"))
        if fn is None or (data.get("suite") == "latency" and not data.get("sweep")):
            print(f"{f}: nothing to plot")
            continue
        print(fn(data, Path(f).with_suffix(".png")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
