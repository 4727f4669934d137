"""Where a benchmark runs: the device, its name for result files, the software versions, copy bandwidth."""
from __future__ import annotations

import datetime
import gc
import os
import platform
import re
import statistics
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# --------------------------------------------------------------------------- device, naming
def setup_device(device: str, threads: int | None = None) -> torch.device:
    """CPU runs use few torch threads (default 1, or $NUDGE_THREADS: `nudge bench --threads N`) so that runs
    compare on a shared 2-core box."""
    dev = torch.device(device)
    if dev.type == "cpu":
        torch.set_num_threads(threads or int(os.environ.get("NUDGE_THREADS") or 1))
    return dev


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {cpu_model()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def usable_cores_label() -> str:
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count()
    return f"{n} usable cores"


def device_slug(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu-" + cpu_model()
    name = re.sub(r"\(r\)|\(tm\)", "", name.lower())
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")[:48]


def git_short() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        return out or "nogit"
    except Exception:
        return "nogit"


def git_dirty() -> bool | None:
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
        return bool(out.strip())
    except Exception:
        return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def environment(device: torch.device) -> dict:
    env = dict(device=device_name(device), python=platform.python_version(), torch=torch.__version__,
               commit=git_short(), dirty=git_dirty(), date=datetime.date.today().isoformat(),
               host_cpu=cpu_model(), cpu_count=os.cpu_count())
    try:
        import transformers
        env["transformers"] = transformers.__version__
    except ImportError:
        env["transformers"] = None
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        try:
            import triton
            env["triton"] = triton.__version__
        except ImportError:
            env["triton"] = None
    return env


def copy_bandwidth_gbps(device: torch.device, nbytes: int = 1 << 30, reps: int = 20) -> float:
    """Device-to-device copy bandwidth (read + write counted), median of `reps` timed copies."""
    if device.type != "cuda":
        return float("nan")
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    free_memory(device)
    return 2 * nbytes / statistics.median(times) / 1e9
