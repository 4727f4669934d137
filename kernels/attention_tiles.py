"""Launch geometry of the paged attention kernels (kernels/paged_attention.py), chosen on the host:
tile sizes per head dim and element size, and the split count of flash-decoding."""
from __future__ import annotations

from typing import NamedTuple

from . import utils  # noqa: F401  (sets up the interpreter on GPU-less machines before triton)
from .utils import is_interpreter, num_sms

import triton

from nudge_engine.layers.attention_metadata import AttentionMetadata
from nudge_engine.layers.attention_torch import NO_WINDOW

# Below this many keys per split the combine pass costs more than the parallelism brings.
_MIN_KEYS_PER_SPLIT = 256
_MAX_SPLITS = 64


class Tiles(NamedTuple):
    block_m: int     # rows (query, head) per tile of the general kernel
    block_n: int     # keys per tile
    num_stages: int  # software pipeline depth of the key loop
    num_warps: int


# Register budget: 128 per thread (so two 4-warp or one 8-warp program fit beside another per
# SM quarter, and no spills). What fills the registers is the fp32 accumulator (BLOCK_M x BLOCK_D),
# the score tile (BLOCK_M x BLOCK_N) and the 64-bit address of every K/V element of a tile
# (BLOCK_N x BLOCK_D: keys are gathered through the block table one by one, so the addresses are
# not affine). Each is divided by the threads of a program, so the tiles below keep
# tile elements / (32 * num_warps) small; benchmarks/compile_gate.py measures the result.
def general_tiles(head_dim: int, elem_size: int, interp: bool) -> Tiles:
    """Tiles of the general kernel, sized so the Q tile plus the double-buffered K and V tiles
    stay well inside shared memory and the registers within budget (see above)."""
    if interp:
        return Tiles(16, 16, 1, 4)
    row_bytes = head_dim * elem_size
    # 32 / 16 rows also fit verify chunks: (k + 1) x GQA group rows, 36 at most for k = 8, group 4.
    if row_bytes <= 256:      # bf16 up to head dim 128, fp32 up to 64
        return Tiles(32, 32, 2, 8)
    if row_bytes <= 512:      # bf16 256, fp32 128
        return Tiles(16, 32, 2, 8)
    return Tiles(16, 16, 2, 8)  # fp32 256


def decode_tiles(head_dim: int, elem_size: int, interp: bool) -> Tiles:
    """Tiles of the decode kernel (block_m unused: one padded GQA group). Memory-bound: 8 warps
    keep many loads in flight and halve the per-thread share of the K/V address tile."""
    if interp:
        return Tiles(16, 16, 1, 4)
    row_bytes = head_dim * elem_size
    if row_bytes <= 256:
        return Tiles(16, 64, 3, 8)
    if row_bytes <= 512:
        return Tiles(16, 32, 2, 8)
    return Tiles(16, 16, 2, 8)


def combine_warps(splits_pad: int, block_d: int) -> int:
    # The combine kernel holds the whole [SPLITS_PAD, BLOCK_D] partial tile in registers.
    return max(1, min(8, splits_pad * block_d // 1024))


def decode_num_splits(meta: AttentionMetadata, num_kv_heads: int, sliding_window: int, device) -> int:
    """Splits per sequence for flash-decoding: enough programs to cover the GPU twice, never
    fewer than _MIN_KEYS_PER_SPLIT keys per split."""
    span = meta.max_seq_len if sliding_window == NO_WINDOW else min(meta.max_seq_len, sliding_window)
    programs = max(meta.num_seqs * num_kv_heads, 1)
    want = triton.cdiv(2 * num_sms(device), programs)
    by_len = triton.cdiv(max(span, 1), _MIN_KEYS_PER_SPLIT if not is_interpreter() else 16)
    return max(1, min(want, by_len, _MAX_SPLITS))
