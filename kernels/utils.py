"""Shared launcher helpers. Importing this before triton lets a GPU-less machine run the kernels.

Without a CUDA device the only way a Triton kernel can run is the interpreter, and triton
decides at `@triton.jit` decoration time, so this must happen before any kernel module is
imported; an explicit TRITON_INTERPRET setting always wins.
"""
from __future__ import annotations

import functools
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def is_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# Streaming multiprocessors assumed off the GPU: small, so the CPU tests exercise the
# multi-program (split) paths; the compile gate sets a real GPU's count to plan production launches.
PRETEND_SMS = 4


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors to fill (PRETEND_SMS off the GPU)."""
    if device.type != "cuda":
        return PRETEND_SMS
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()
