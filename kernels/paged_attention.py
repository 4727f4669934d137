"""Paged attention over variable-length query chunks (same semantics as paged_attention_torch).

One launch serves any mix of prefill chunks, k-token drafts and single decode tokens: the
queries of sequence i are its last qlen_i context positions, causal among themselves.

Two kernels:
- `_paged_attention_kernel` (any query lengths): one program per (sequence, tile of query
  rows, KV head). The rows of a tile are (query, head-of-the-GQA-group) pairs, so each K/V
  tile is loaded once for the whole group. Online softmax over the keys.
- `_paged_decode_kernel` + `_decode_combine_kernel` (all qlen == 1, flash-decoding): a decode
  program has only one query row per head, so one program per (sequence, KV head) cannot fill
  the GPU at small batch; the context is split across programs, each writes a partial output
  with its log-sum-exp, and the combine kernel merges them.

Keys are gathered through the block table one key at a time (not one page at a time), so any
block size works, including ones smaller than the key tile.

Registers: at the production shapes (head dim 64 / 128 / 256, bf16 / fp16, GQA groups 1-4, block
sizes 16 / 32) every kernel here compiles to at most 128 registers per thread with no spills on
sm_80 and sm_90 (benchmarks/compile_gate.py checks it; tables in benchmarks/results/). The split
count of flash-decoding is a runtime argument, so one binary serves every batch and context length.
"""
from __future__ import annotations

import torch

from . import utils  # noqa: F401  (sets up the interpreter on GPU-less machines before triton)
from .utils import is_interpreter, next_pow2
from .attention_tiles import combine_warps, decode_num_splits, decode_tiles, general_tiles

import triton
import triton.language as tl

from nudge_engine.layers.attention_metadata import NO_BLOCK, AttentionMetadata
from nudge_engine.layers.attention_torch import NO_SOFTCAP, NO_WINDOW

_NO_BLOCK = tl.constexpr(NO_BLOCK)
_LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _softcap(s, softcap):
    # tanh(x) = 1 - 2 / (exp(2x) + 1): exact at both infinities, no libdevice needed.
    x = s / softcap
    return (1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)) * softcap


@triton.jit
def _mma(a, b, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    # The interpreter's tl.dot multiplies bfloat16 operands as their raw uint16 bits, so under
    # it the (already rounded) operands go in as float32, which gives the same products.
    if DOT_UPCAST:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b, input_precision=DOT_PRECISION)
    return c


@triton.jit
def _attend_tile(
    q,                # [BLOCK_M, BLOCK_D] query rows, already in the compute dtype
    q_pos,            # [BLOCK_M] context position of each row
    m_i, l_i, acc,    # running max (log2 units) [BLOCK_M], sum [BLOCK_M], output [BLOCK_M, BLOCK_D]
    k_base, v_base,   # cache pointers advanced to this KV head
    table_row,        # block table pointer of this sequence
    start_n, kv_hi,   # this tile covers keys [start_n, start_n + BLOCK_N), valid below kv_hi
    BLOCK_SIZE: tl.constexpr,  # cache block size: a constant, so // and % are shifts
    stride_kb, stride_ks, stride_vb, stride_vs,
    offs_d, d_mask,
    qk_scale,         # softmax scale (times log2(e) when there is no softcap)
    softcap, sliding_window,
    USE_WINDOW: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):
    k_pos = start_n + tl.arange(0, BLOCK_N)
    k_in = k_pos < kv_hi
    blk = tl.load(table_row + k_pos // BLOCK_SIZE, mask=k_in, other=_NO_BLOCK)
    # Keys of an unmapped block are invisible, like key_valid in plan_torch.
    k_ok = k_in & (blk != _NO_BLOCK)
    blk64 = tl.where(k_ok, blk, 0).to(tl.int64)
    in_blk = (k_pos % BLOCK_SIZE).to(tl.int64)

    kv_mask = k_ok[:, None] & d_mask[None, :]
    k = tl.load(k_base + (blk64 * stride_kb + in_blk * stride_ks)[:, None] + offs_d[None, :],
                mask=kv_mask, other=0.0)
    s = _mma(q, tl.trans(k.to(q.dtype)), DOT_PRECISION, DOT_UPCAST)  # [BLOCK_M, BLOCK_N] f32
    if USE_SOFTCAP:
        s = _softcap(s * qk_scale, softcap) * _LOG2E
    else:
        s = s * qk_scale

    visible = k_ok[None, :] & (k_pos[None, :] <= q_pos[:, None])
    if USE_WINDOW:
        visible = visible & (k_pos[None, :] > q_pos[:, None] - sliding_window)
    s = tl.where(visible, s, float("-inf"))

    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # A row with nothing visible yet keeps m = -inf; shift by 0 there so no inf - inf appears.
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_shift[:, None])
    alpha = tl.exp2(m_i - m_shift)
    l_i = l_i * alpha + tl.sum(p, axis=1)

    v = tl.load(v_base + (blk64 * stride_vb + in_blk * stride_vs)[:, None] + offs_d[None, :],
                mask=kv_mask, other=0.0)
    acc = acc * alpha[:, None] + _mma(p.to(q.dtype), v.to(q.dtype), DOT_PRECISION, DOT_UPCAST)
    return m_new, l_i, acc


@triton.jit
def _paged_attention_kernel(
    out_ptr,              # [num_tokens, num_heads, head_dim]
    q_ptr,                # [num_tokens, num_heads, head_dim]
    k_cache_ptr,          # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,          # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables_ptr,     # [num_seqs, max_blocks] int32, NO_BLOCK padded
    query_start_loc_ptr,  # [num_seqs + 1] int32
    seq_lens_ptr,         # [num_seqs] int32
    qk_scale, softcap, sliding_window,
    head_dim,
    stride_qt, stride_qh,
    stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_bt,
    BLOCK_SIZE: tl.constexpr,  # cache block size
    GROUP: tl.constexpr,       # query heads per KV head
    GROUP_PAD: tl.constexpr,   # GROUP rounded up to a power of two
    BLOCK_Q: tl.constexpr,     # queries per tile; BLOCK_M = BLOCK_Q * GROUP_PAD rows
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):
    seq = tl.program_id(0)
    q_tile = tl.program_id(1)
    kv_head = tl.program_id(2)
    BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_PAD

    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    # The grid is sized for the longest query; shorter sequences have idle tiles.
    if q_tile * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    first_q_pos = seq_len - q_len

    offs_m = tl.arange(0, BLOCK_M)
    q_idx = q_tile * BLOCK_Q + offs_m // GROUP_PAD        # query within the sequence
    head = kv_head * GROUP + offs_m % GROUP_PAD
    row_ok = (q_idx < q_len) & (offs_m % GROUP_PAD < GROUP)
    q_pos = first_q_pos + q_idx
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim

    token = (q_start + q_idx).to(tl.int64)
    q_rows = token * stride_qt + head * stride_qh
    q = tl.load(q_ptr + q_rows[:, None] + offs_d[None, :],
                mask=row_ok[:, None] & d_mask[None, :], other=0.0)

    # Keys that any row of this tile can see: causal bound from the last row, window from the first.
    tile_first_pos = first_q_pos + q_tile * BLOCK_Q
    kv_hi = tl.minimum(tile_first_pos + BLOCK_Q, seq_len)
    kv_lo = 0
    if USE_WINDOW:
        kv_lo = tl.maximum(tile_first_pos - sliding_window + 1, 0)
        kv_lo = (kv_lo // BLOCK_N) * BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_base = k_cache_ptr + kv_head * stride_kh
    v_base = v_cache_ptr + kv_head * stride_vh
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for start_n in range(kv_lo, kv_hi, BLOCK_N):
        m_i, l_i, acc = _attend_tile(
            q, q_pos, m_i, l_i, acc, k_base, v_base, table_row, start_n, kv_hi, BLOCK_SIZE,
            stride_kb, stride_ks, stride_vb, stride_vs, offs_d, d_mask,
            qk_scale, softcap, sliding_window,
            USE_WINDOW, USE_SOFTCAP, BLOCK_N, DOT_PRECISION, DOT_UPCAST)

    # A row that saw no key (all its pages unmapped) is 0, like the reference's nan_to_num.
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_rows = token * stride_ot + head * stride_oh
    tl.store(out_ptr + o_rows[:, None] + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & d_mask[None, :])


@triton.jit(do_not_specialize=["num_splits"])
def _paged_decode_kernel(
    out_ptr,              # [num_tokens, num_heads, head_dim]  (written only without SPLIT)
    part_out_ptr,         # [num_seqs, num_heads, num_splits, head_dim] f32, normalized per split
    part_lse_ptr,         # [num_seqs, num_heads, num_splits] f32, log2 units, -inf = empty split
    q_ptr,                # [num_tokens, num_heads, head_dim]
    k_cache_ptr,          # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,          # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables_ptr,     # [num_seqs, max_blocks] int32, NO_BLOCK padded
    query_start_loc_ptr,  # [num_seqs + 1] int32
    seq_lens_ptr,         # [num_seqs] int32
    qk_scale, softcap, sliding_window,
    keys_per_split,       # a multiple of BLOCK_N
    num_splits,           # a runtime value: one binary serves every split count
    num_heads, head_dim,
    stride_qt, stride_qh,
    stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_bt,
    BLOCK_SIZE: tl.constexpr,  # cache block size
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,     # GROUP padded up to a power of two >= 16 (tl.dot minimum)
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLIT: tl.constexpr,       # num_splits > 1: write partials for _decode_combine_kernel
    USE_WINDOW: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if q_len == 0:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    q_pos_scalar = seq_len - 1

    offs_m = tl.arange(0, BLOCK_M)
    head = kv_head * GROUP + offs_m
    row_ok = offs_m < GROUP
    q_pos = tl.zeros([BLOCK_M], tl.int32) + q_pos_scalar
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    token = q_start.to(tl.int64)
    q = tl.load(q_ptr + token * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_mask[None, :], other=0.0)

    # Splits partition only the keys the query can see, so a sliding window wastes no split.
    ctx_lo = 0
    if USE_WINDOW:
        ctx_lo = tl.maximum(seq_len - sliding_window, 0)
    kv_lo = ctx_lo + split * keys_per_split
    kv_hi = tl.minimum(kv_lo + keys_per_split, seq_len)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_base = k_cache_ptr + kv_head * stride_kh
    v_base = v_cache_ptr + kv_head * stride_vh
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for start_n in range(kv_lo, kv_hi, BLOCK_N):
        m_i, l_i, acc = _attend_tile(
            q, q_pos, m_i, l_i, acc, k_base, v_base, table_row, start_n, kv_hi, BLOCK_SIZE,
            stride_kb, stride_ks, stride_vb, stride_vs, offs_d, d_mask,
            qk_scale, softcap, sliding_window,
            USE_WINDOW, USE_SOFTCAP, BLOCK_N, DOT_PRECISION, DOT_UPCAST)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    if not SPLIT:
        tl.store(out_ptr + token * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_mask[None, :])
    else:
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i)))
        part_row = (seq.to(tl.int64) * num_heads + head) * num_splits + split
        tl.store(part_lse_ptr + part_row, lse, mask=row_ok)
        tl.store(part_out_ptr + part_row[:, None] * head_dim + offs_d[None, :], out,
                 mask=row_ok[:, None] & d_mask[None, :])


@triton.jit(do_not_specialize=["num_splits"])
def _decode_combine_kernel(
    out_ptr,              # [num_tokens, num_heads, head_dim]
    part_out_ptr,         # [num_seqs, num_heads, num_splits, head_dim] f32
    part_lse_ptr,         # [num_seqs, num_heads, num_splits] f32, log2 units
    query_start_loc_ptr,  # [num_seqs + 1] int32
    num_splits,
    num_heads, head_dim,
    stride_ot, stride_oh,
    SPLITS_PAD: tl.constexpr,  # num_splits rounded up to a power of two
    BLOCK_D: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_start = tl.load(query_start_loc_ptr + seq)
    if tl.load(query_start_loc_ptr + seq + 1) == q_start:
        return
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < num_splits
    part_row = (seq.to(tl.int64) * num_heads + head) * num_splits + offs_s
    lse = tl.load(part_lse_ptr + part_row, mask=s_ok, other=float("-inf"))
    lse_max = tl.max(lse, axis=0)
    # Every split empty (no visible key): weights 0 and the output is 0, as in the reference.
    w = tl.where(lse == float("-inf"), 0.0, tl.exp2(lse - tl.where(lse_max == float("-inf"), 0.0, lse_max)))
    part = tl.load(part_out_ptr + part_row[:, None] * head_dim + offs_d[None, :],
                   mask=(w > 0.0)[:, None] & (offs_d < head_dim)[None, :], other=0.0)
    w_sum = tl.sum(w, axis=0)
    out = tl.sum(part * w[:, None], axis=0) / tl.where(w_sum == 0.0, 1.0, w_sum)
    dst = out_ptr + q_start.to(tl.int64) * stride_ot + head * stride_oh + offs_d
    tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=offs_d < head_dim)


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 models must not silently drop to TF32 (10-bit mantissa) in attention scores.
    return "ieee" if dtype == torch.float32 else "tf32"


def paged_attention(
    query: torch.Tensor,    # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int = NO_WINDOW,
    softcap: float = NO_SOFTCAP,
    *,
    decode: bool | None = None,     # None: use the decode kernel iff every qlen == 1
    num_splits: int | None = None,  # decode only; None: decode_num_splits
    out: torch.Tensor | None = None,
) -> torch.Tensor:                  # [num_tokens, num_heads, head_dim]
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = k_cache.shape[2]
    block_size = k_cache.shape[1]
    assert num_heads % num_kv_heads == 0
    assert query.stride(2) == 1 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1
    if out is None:
        out = torch.empty_like(query, memory_format=torch.contiguous_format)
    if num_tokens == 0 or meta.num_seqs == 0:
        return out
    group = num_heads // num_kv_heads
    use_window = sliding_window != NO_WINDOW
    use_softcap = softcap != NO_SOFTCAP
    # Without softcap the scale folds log2(e) in, so the kernels use exp2 directly.
    qk_scale = scale if use_softcap else scale * 1.4426950408889634
    block_d = next_pow2(max(head_dim, 16))
    interp = is_interpreter()
    common_strides = (
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        meta.block_tables.stride(0),
    )
    if decode is None:
        decode = meta.max_query_len == 1

    if decode:
        splits = num_splits or decode_num_splits(meta, num_kv_heads, sliding_window, query.device)
        tiles = decode_tiles(block_d, query.element_size(), interp)
        block_n = tiles.block_n
        span = meta.max_seq_len if not use_window else min(meta.max_seq_len, sliding_window)
        keys_per_split = triton.cdiv(triton.cdiv(max(span, 1), splits), block_n) * block_n
        if splits > 1:
            part_out = torch.empty(meta.num_seqs, num_heads, splits, head_dim, dtype=torch.float32, device=query.device)
            part_lse = torch.empty(meta.num_seqs, num_heads, splits, dtype=torch.float32, device=query.device)
        else:
            part_out = part_lse = out  # unused: the single split writes the output itself
        _paged_decode_kernel[(meta.num_seqs, num_kv_heads, splits)](
            out, part_out, part_lse, query, k_cache, v_cache,
            meta.block_tables, meta.query_start_loc, meta.seq_lens,
            qk_scale, float(softcap), int(sliding_window), keys_per_split, splits,
            num_heads, head_dim, *common_strides,
            BLOCK_SIZE=block_size, GROUP=group, BLOCK_M=max(16, next_pow2(group)), BLOCK_N=block_n, BLOCK_D=block_d,
            SPLIT=splits > 1, USE_WINDOW=use_window, USE_SOFTCAP=use_softcap,
            DOT_PRECISION=_dot_precision(query.dtype), DOT_UPCAST=interp,
            num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        )
        if splits > 1:
            _decode_combine_kernel[(meta.num_seqs, num_heads)](
                out, part_out, part_lse, meta.query_start_loc, splits,
                num_heads, head_dim, out.stride(0), out.stride(1),
                SPLITS_PAD=next_pow2(splits), BLOCK_D=block_d,
                num_warps=combine_warps(next_pow2(splits), block_d),
            )
        return out

    group_pad = next_pow2(group)
    # A tile holds at least one full GQA group (so K/V are read once per group).
    block_m, block_n, stages, warps = general_tiles(block_d, query.element_size(), interp)
    block_m = max(block_m, group_pad)
    block_q = block_m // group_pad
    grid = (meta.num_seqs, triton.cdiv(meta.max_query_len, block_q), num_kv_heads)
    _paged_attention_kernel[grid](
        out, query, k_cache, v_cache,
        meta.block_tables, meta.query_start_loc, meta.seq_lens,
        qk_scale, float(softcap), int(sliding_window),
        head_dim, *common_strides,
        BLOCK_SIZE=block_size, GROUP=group, GROUP_PAD=group_pad, BLOCK_Q=block_q, BLOCK_N=block_n, BLOCK_D=block_d,
        USE_WINDOW=use_window, USE_SOFTCAP=use_softcap,
        DOT_PRECISION=_dot_precision(query.dtype), DOT_UPCAST=interp,
        num_warps=warps,
        num_stages=stages,
    )
    return out
