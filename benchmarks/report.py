"""Result files and tables, and the command-line options every suite shares."""
from __future__ import annotations

import datetime
import json
import math
from pathlib import Path
from typing import Any

import torch

from .hardware import ROOT, device_slug, git_short, setup_device
from .pairs import MODEL_CHOICES

RESULTS_DIR = ROOT / "benchmarks" / "results"


# --------------------------------------------------------------------------- results
def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(rows: list[dict], columns: list[tuple[str, str]], digits: int = 2) -> str:
    head = "| " + " | ".join(title for _, title in columns) + " |"
    rule = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|"
    body = ["| " + " | ".join(fmt(r.get(key), digits) for key, _ in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def result_stem(device: torch.device, suite: str, models: str, commit: str | None = None) -> str:
    """<YYYY-MM-DD>_<card-or-cpu-slug>_<git short commit>_<suite>[-<pair>] (pair only when not the default)."""
    tag = "" if models in ("tiny", "olmo2-7b") else f"-{models.replace('/', '-')}"
    return f"{datetime.date.today().isoformat()}_{device_slug(device)}_{commit or git_short()}_{suite}{tag}"


def write_results(out_dir: str | Path | None, device: torch.device, suite: str, models: str, data: dict,
                  markdown: str) -> tuple[Path, Path]:
    """JSON + markdown into out_dir (default benchmarks/results); the commit is the one the run started on."""
    out = Path(out_dir) if out_dir else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    stem = result_stem(device, suite, models, data.get("env", {}).get("commit"))
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    json_path.write_text(json.dumps(data, indent=1, default=_json_default) + "\n")
    md_path.write_text(markdown.rstrip() + "\n")
    return json_path, md_path


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, float) and math.isnan(o):
        return None
    return str(o)


def common_args(parser, *, tiny_help: str = "CPU, tiny factory models"):
    parser.add_argument("--tiny", action="store_true", help=tiny_help)
    parser.add_argument("--quick", action="store_true", help="fewer prompts, tokens and configurations")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available, cpu with --tiny)")
    parser.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: bfloat16 on GPU, float32 on CPU)")
    parser.add_argument("--out", default=None, help=f"folder for the result files (default {RESULTS_DIR})")
    parser.add_argument("--models", default=None, choices=MODEL_CHOICES,
                        help="model pair (default: tiny with --tiny, else olmo2-7b)")
    parser.add_argument("--shrink", type=int, default=1,
                        help="real-shape pairs: divide widths and head counts by this (layers, vocab kept)")
    parser.add_argument("--work-dir", default=None, help="where to write the model folders (default: a scratch dir)")
    parser.add_argument("--threads", type=int, default=None, help="CPU torch threads (default 1)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds: optional parts (sweep points, larger batches) are skipped when time runs short")


def resolve_common(args) -> tuple[torch.device, str, str]:
    if args.device is None:
        args.device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    device = setup_device(args.device, args.threads)
    if args.models is None:
        args.models = "tiny" if args.tiny or device.type == "cpu" else "olmo2-7b"
    if args.dtype is None:
        args.dtype = "bfloat16" if device.type == "cuda" else "float32"
    return device, args.dtype, args.models
