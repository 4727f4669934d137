"""paged_attention (Triton) equals paged_attention_torch; TritonAttentionBackend equals
TorchAttentionBackend. CPU: TRITON_INTERPRET=1; NUDGE_TEST_DEVICE=cuda: GPU."""
import os

import torch

DEVICE = os.environ.get("NUDGE_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE == "cpu":
    # Before triton decorates any kernel: on the CPU the interpreter is the only way to run them.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("NUDGE_TEST_DEVICE=cuda but no CUDA device", allow_module_level=True)

from nudge_engine.kernels.backend import TritonAttentionBackend  # noqa: E402
from nudge_engine.kernels.paged_attention import paged_attention  # noqa: E402
from nudge_engine.layers.attention_metadata import NO_BLOCK, NO_SLOT, AttentionMetadata  # noqa: E402
from nudge_engine.layers.attention_torch import TorchAttentionBackend, paged_attention_torch  # noqa: E402

# The interpreter evaluates inf - inf in masked-out lanes; the results are discarded.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

# (dtype, atol, rtol). The reference always runs in float32 on the same (rounded) inputs:
# torch's bf16 einsum rounds the scores to bf16, the kernel keeps them in float32, so the
# float32 reference is the tighter yardstick.
DTYPES = [
    (torch.float32, 2e-5, 1e-5),
    (torch.bfloat16, 2e-2, 2e-2),
]


def make_batch(seqs, num_heads, num_kv_heads, head_dim, block_size, dtype, seed, unmap_before=None):
    """Random paged caches and queries for sequences given as (context_len, query_len).

    Blocks are scattered at random over a cache with spare blocks; block tables are padded
    with NO_BLOCK. unmap_before: blocks entirely before this position are NO_BLOCK (freed
    pages of a sliding-window model).
    """
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-ctx // block_size) for ctx, _ in seqs]
    num_blocks = sum(blocks_per_seq) + 3
    perm = torch.randperm(num_blocks, generator=gen)
    tables = torch.full((len(seqs), max(blocks_per_seq) + 1), NO_BLOCK, dtype=torch.int32)
    used = 0
    for i, n in enumerate(blocks_per_seq):
        tables[i, :n] = perm[used:used + n]
        used += n
        if unmap_before is not None:
            tables[i, :max(0, (seqs[i][0] - unmap_before) // block_size)] = NO_BLOCK
    qlens = [q for _, q in seqs]
    qsl = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    qsl[1:] = torch.tensor(qlens).cumsum(0)
    slot_mapping = []
    for i, (ctx, q) in enumerate(seqs):
        for pos in range(ctx - q, ctx):
            blk = int(tables[i, pos // block_size])
            slot_mapping.append(NO_SLOT if blk == NO_BLOCK else blk * block_size + pos % block_size)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slot_mapping, dtype=torch.int64),
        block_tables=tables,
        query_start_loc=qsl,
        seq_lens=torch.tensor([ctx for ctx, _ in seqs], dtype=torch.int32),
        max_query_len=max(qlens),
        max_seq_len=max(ctx for ctx, _ in seqs),
        block_size=block_size,
    )
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    query = torch.randn(sum(qlens), num_heads, head_dim, generator=gen).to(dtype)
    return query, k_cache, v_cache, meta


def meta_to(meta, device):
    return AttentionMetadata(
        slot_mapping=meta.slot_mapping.to(device), block_tables=meta.block_tables.to(device),
        query_start_loc=meta.query_start_loc.to(device), seq_lens=meta.seq_lens.to(device),
        max_query_len=meta.max_query_len, max_seq_len=meta.max_seq_len, block_size=meta.block_size)


def reference(query, k_cache, v_cache, meta, scale, window, softcap):
    return paged_attention_torch(query.float(), k_cache.float(), v_cache.float(), meta_to(meta, "cpu"),
                                 scale, window, softcap)


# id: (seqs as (context_len, query_len), heads, kv_heads, head_dim, block_size, window, softcap)
MIXED = {
    "one_prefill": ([(37, 37)], 2, 2, 16, 16, 0, 0.0),
    "mixed_gqa": ([(37, 5), (16, 16), (3, 1), (50, 3)], 4, 2, 32, 8, 0, 0.0),
    "group3_chunk": ([(29, 7), (9, 9)], 6, 2, 16, 4, 0, 0.0),
    "window": ([(40, 9), (20, 20), (5, 1)], 4, 1, 16, 8, 7, 0.0),
    "softcap_bs5": ([(23, 6), (8, 1), (17, 17)], 4, 2, 16, 5, 0, 2.5),
    "window_softcap": ([(45, 4), (12, 2)], 2, 2, 16, 8, 16, 5.0),
    "hd64": ([(33, 4), (9, 1)], 4, 2, 64, 16, 0, 0.0),
    "hd128": ([(20, 3)], 2, 1, 128, 16, 0, 0.0),
}
DECODE = {
    "decode_gqa": ([(37, 1), (60, 1), (1, 1), (17, 1)], 8, 2, 16, 16, 0, 0.0),
    "decode_mha_bs6": ([(64, 1), (5, 1)], 2, 2, 32, 6, 0, 0.0),
    "decode_window_softcap": ([(70, 1), (9, 1), (33, 1)], 4, 2, 16, 8, 12, 4.0),
    "decode_hd256": ([(19, 1)], 2, 1, 256, 16, 0, 0.0),
}


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("case", list(MIXED), ids=list(MIXED))
def test_paged_attention_mixed_queries(case, dtype, atol, rtol):
    seqs, heads, kv_heads, head_dim, block_size, window, softcap = MIXED[case]
    q, kc, vc, meta = make_batch(seqs, heads, kv_heads, head_dim, block_size, dtype, seed=len(case))
    scale = head_dim ** -0.5
    ref = reference(q, kc, vc, meta, scale, window, softcap)
    out = paged_attention(q.to(DEVICE), kc.to(DEVICE), vc.to(DEVICE), meta_to(meta, DEVICE), scale, window, softcap)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.float().cpu(), ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("path", ["auto", "splits1", "splits3", "general"])
@pytest.mark.parametrize("case", list(DECODE), ids=list(DECODE))
def test_paged_attention_decode(case, path, dtype, atol, rtol):
    seqs, heads, kv_heads, head_dim, block_size, window, softcap = DECODE[case]
    q, kc, vc, meta = make_batch(seqs, heads, kv_heads, head_dim, block_size, dtype, seed=len(case) + 7)
    scale = head_dim ** -0.5
    ref = reference(q, kc, vc, meta, scale, window, softcap)
    kwargs = {"auto": {}, "splits1": {"num_splits": 1}, "splits3": {"num_splits": 3},
              "general": {"decode": False}}[path]
    out = paged_attention(q.to(DEVICE), kc.to(DEVICE), vc.to(DEVICE), meta_to(meta, DEVICE), scale,
                          window, softcap, **kwargs)
    torch.testing.assert_close(out.float().cpu(), ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("decode", [False, True])
def test_paged_attention_unmapped_blocks_outside_window(decode):
    # Pages wholly outside the window may be freed (NO_BLOCK): they must never be read.
    seqs = [(41, 1), (30, 1)] if decode else [(41, 3), (30, 2)]
    q, kc, vc, meta = make_batch(seqs, 4, 2, 16, 4, torch.float32, seed=3, unmap_before=10)
    ref = reference(q, kc, vc, meta, 0.25, 10, 0.0)
    out = paged_attention(q.to(DEVICE), kc.to(DEVICE), vc.to(DEVICE), meta_to(meta, DEVICE), 0.25, 10, 0.0)
    torch.testing.assert_close(out.cpu(), ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("seqs", [[(21, 21), (13, 4), (6, 1)], [(30, 1), (7, 1)]], ids=["mixed", "decode"])
def test_backend_matches_torch_backend(seqs, dtype, atol, rtol):
    """Store the new tokens' K/V through slot_mapping, then attend: caches and outputs equal."""
    heads, kv_heads, head_dim = 4, 2, 16
    q, kc, vc, meta = make_batch(seqs, heads, kv_heads, head_dim, 8, dtype, seed=11)
    gen = torch.Generator().manual_seed(5)
    num_tokens = q.shape[0]
    # Q, K, V as views of one fused projection, like the models produce them.
    qkv = torch.randn(num_tokens, heads + 2 * kv_heads, head_dim, generator=gen).to(dtype)
    query, key, value = qkv[:, :heads], qkv[:, heads:heads + kv_heads], qkv[:, heads + kv_heads:]

    torch_backend = TorchAttentionBackend()
    k_ref, v_ref = kc.float(), vc.float()
    meta_ref = meta_to(meta, "cpu")
    torch_backend.plan(meta_ref)
    ref = torch_backend.forward(query.float(), key.float(), value.float(), k_ref, v_ref, meta_ref, 0.3)

    backend = TritonAttentionBackend()
    k_dev, v_dev = kc.to(DEVICE), vc.to(DEVICE)
    meta_dev = meta_to(meta, DEVICE)
    backend.plan(meta_dev)
    out = backend.forward(query.to(DEVICE), key.to(DEVICE), value.to(DEVICE), k_dev, v_dev, meta_dev, 0.3)
    assert backend.name == "triton"
    torch.testing.assert_close(k_dev.float().cpu(), k_ref.to(dtype).float(), atol=0, rtol=0)
    torch.testing.assert_close(v_dev.float().cpu(), v_ref.to(dtype).float(), atol=0, rtol=0)
    torch.testing.assert_close(out.float().cpu(), ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("window", [0, 5])
def test_sdpa_fast_path_equals_reference(window):
    """The CPU backend's fused-SDPA path equals the plain reference (mixed query lengths, GQA)."""
    from nudge_engine.layers.attention_torch import paged_attention_sdpa, paged_attention_torch
    from nudge_engine.layers.attention_metadata import AttentionMetadata
    gen = torch.Generator().manual_seed(window)
    block, heads, kv_heads, dim = 4, 8, 2, 16
    k_cache = torch.randn(20, block, kv_heads, dim, generator=gen)
    v_cache = torch.randn(20, block, kv_heads, dim, generator=gen)
    seq_lens, q_lens = [9, 1, 14], [3, 1, 14]
    tables = torch.tensor([[3, 7, 1, -1], [5, -1, -1, -1], [0, 2, 4, 6]], dtype=torch.int32)
    qsl = torch.tensor([0, 3, 4, 18], dtype=torch.int32)
    query = torch.randn(sum(q_lens), heads, dim, generator=gen)

    def meta():
        return AttentionMetadata(torch.zeros(18, dtype=torch.long), tables, qsl,
                                 torch.tensor(seq_lens, dtype=torch.int32), max(q_lens), max(seq_lens), block)

    ref = paged_attention_torch(query, k_cache, v_cache, meta(), 0.25, window)
    fast = paged_attention_sdpa(query, k_cache, v_cache, meta(), 0.25, window)
    torch.testing.assert_close(fast, ref, atol=2e-6, rtol=1e-5)
