"""A cached directory holding one Triton version, for the compile gate to run the GPU image's Triton.

The GPU machines run Triton 3.6 while this machine's venv may hold a newer one. Kernels need only
triton to compile (torch and the engine come from the running interpreter), so the gate puts a
`pip install --target` directory first on PYTHONPATH: its triton shadows the venv's, nothing else
changes. Installed once per Triton version and Python version (seconds from PyPI), then reused.

    ${NUDGE_CACHE_DIR:-~/.cache/nudge_engine}/triton-<version>-py<major><minor>/
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("NUDGE_CACHE_DIR") or Path.home() / ".cache" / "nudge_engine")


def triton_env(version: str, log=print) -> Path:
    """The directory to put first on PYTHONPATH for `import triton` to give `version`."""
    target = cache_dir() / f"triton-{version}-py{sys.version_info.major}{sys.version_info.minor}"
    if (target / "triton" / "__init__.py").exists() and (target / f"triton-{version}.dist-info").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log(f"installing triton=={version} into {target} (once)")
    # Into a temporary sibling, then renamed: a killed install never leaves a half environment.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        "--no-deps", "--target", str(tmp), f"triton=={version}"], check=True)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
