"""The draft policy's default beside the fixed draft lengths, for the latency and throughput tables.

Both suites run nudging with draft_tokens fixed at each k and with the default (adaptive, k <= 4);
`compare` finds, per cell (batch size / concurrency), the best fixed k in FIXED_KS that ran and the
default's tokens/s over it; `lines` renders that under a suite's table.
"""
from __future__ import annotations

FIXED_KS = (0, 1, 2, 4)


def compare(rows: list[dict], cell: str, is_default, fixed_k) -> list[dict]:
    """rows: the suite's rows; cell: the key that names a cell; is_default(row) -> bool; fixed_k(row) -> the
    row's fixed k or None. Sets row["vs_best_k"] on each default row; returns one summary per cell."""
    out = []
    for d in [r for r in rows if is_default(r) and "tok_s" in r]:
        fixed = {fixed_k(r): r["tok_s"] for r in rows
                 if r.get(cell) == d.get(cell) and "tok_s" in r and fixed_k(r) in FIXED_KS}
        if not fixed:
            continue
        best_k = max(fixed, key=fixed.get)
        d["vs_best_k"] = d["tok_s"] / fixed[best_k]
        out.append({cell: d.get(cell), "default_tok_s": d["tok_s"], "best_k": best_k, "best_tok_s": fixed[best_k],
                    "vs_best_k": d["vs_best_k"], **{f"k{k}_tok_s": v for k, v in sorted(fixed.items())}})
    return out


def lines(summary: list[dict], cell: str) -> list[str]:
    if not summary:
        return []
    ks = sorted({int(key[1:-6]) for s in summary for key in s if key.startswith("k") and key.endswith("_tok_s")})
    head = f"| {cell} | " + " | ".join(f"k={k}" for k in ks) + " | default | best fixed | default / best |"
    rule = "|---|" + "---:|" * (len(ks) + 3)
    body = [f"| {s[cell]} | " + " | ".join(f"{s.get(f'k{k}_tok_s', float('nan')):.1f}" for k in ks)
            + f" | {s['default_tok_s']:.1f} | k={s['best_k']} | {s['vs_best_k']:.3f} |" for s in summary]
    return ["", f"## The default beside each fixed k (tok/s; best of k in {FIXED_KS} that ran)", "", head, rule, *body]
