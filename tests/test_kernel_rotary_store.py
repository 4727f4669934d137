"""rotary_store (Triton) equals rotary_store_torch: clip (OLMo), QK-norm (OLMo-2), rotary with
plain and Llama-3-scaled tables, GQA and MHA, K/V into the paged cache with skipped slots.
CPU: TRITON_INTERPRET=1; NUDGE_TEST_DEVICE=cuda: GPU."""
import os

import torch

DEVICE = os.environ.get("NUDGE_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("NUDGE_TEST_DEVICE=cuda but no CUDA device", allow_module_level=True)

from nudge_engine.model.config import RopeConfig  # noqa: E402
from nudge_engine.kernels.rotary_store import rotary_store  # noqa: E402
from nudge_engine.layers.attention import AttentionSpec  # noqa: E402
from nudge_engine.layers.attention_metadata import NO_SLOT  # noqa: E402
from nudge_engine.layers.attention_torch import rotary_store_torch  # noqa: E402
from nudge_engine.layers.norm import RMSNorm  # noqa: E402
from nudge_engine.layers.rotary import RotaryEmbedding  # noqa: E402

# (dtype, atol, rtol), atol in units of the largest |reference| value: rotation is float32 and
# rounds once, the QK-norm rounds as RMSNorm does; its reduction order differs, so an ulp or two.
DTYPES = [
    (torch.float32, 1e-6, 1e-5),
    (torch.bfloat16, 2 ** -7, 2 ** -6),
    (torch.float16, 2 ** -10, 2 ** -9),
]
LLAMA3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
MAX_POSITIONS = 300
# id: (num_tokens, heads, kv_heads, head_dim, rope, clip_qkv, qk_norm, block_size, num_blocks)
CASES = {
    "llama_gqa": (7, 4, 2, 16, RopeConfig(10000.0, None), None, False, 4, 4),
    "llama3_scaled": (5, 4, 1, 32, RopeConfig(500000.0, LLAMA3), None, False, 16, 2),
    "olmo_clip_hd24": (6, 3, 3, 24, RopeConfig(10000.0, None), 0.75, False, 5, 3),
    "olmo2_qk_norm": (9, 4, 2, 16, RopeConfig(500000.0, None), None, True, 8, 3),
    "gemma2_mha_hd128": (3, 2, 2, 128, RopeConfig(10000.0, None), None, False, 4, 2),
}


def make_case(case, dtype):
    num_tokens, heads, kv_heads, head_dim, rope, clip, qk_norm, block_size, num_blocks = CASES[case]
    gen = torch.Generator().manual_seed(len(case) * 17 + num_tokens)
    spec = AttentionSpec(heads, kv_heads, head_dim, head_dim ** -0.5, clip_qkv=clip,
                         qk_norm_eps=1e-6 if qk_norm else None)
    rotary = RotaryEmbedding(head_dim, MAX_POSITIONS, rope)
    norms = (None, None)
    if qk_norm:
        norms = (RMSNorm(heads * head_dim, 1e-6), RMSNorm(kv_heads * head_dim, 1e-6))
        with torch.no_grad():
            for norm in norms:
                norm.weight.copy_(1.0 + 0.3 * torch.randn(norm.weight.shape, generator=gen))
        norms = tuple(n.to(dtype) for n in norms)
    qkv = torch.randn(num_tokens, (heads + 2 * kv_heads) * head_dim, generator=gen).to(dtype)
    positions = torch.randint(0, MAX_POSITIONS, (num_tokens,), generator=gen)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[torch.rand(num_tokens, generator=gen) < 0.25] = NO_SLOT
    slots[0] = -5  # any negative slot is skipped, as in store_kv_torch
    shape = (num_blocks, block_size, kv_heads, head_dim)
    caches = torch.randn(shape, generator=gen).to(dtype), torch.randn(shape, generator=gen).to(dtype)
    return spec, rotary, norms, qkv, positions, slots, caches


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_rotary_store_matches_torch(case, dtype, atol, rtol):
    spec, rotary, (q_norm, k_norm), qkv, positions, slots, (k_old, v_old) = make_case(case, dtype)
    k_ref, v_ref = k_old.clone(), v_old.clone()
    with torch.no_grad():
        want_q = rotary_store_torch(qkv, positions, spec, rotary, q_norm, k_norm, k_ref, v_ref, slots)
        k_cache, v_cache = k_old.to(DEVICE), v_old.to(DEVICE)
        dev = (lambda m: m.to(DEVICE) if m is not None else None)
        got_q = rotary_store(qkv.to(DEVICE), positions.to(DEVICE), spec, rotary.to(DEVICE), dev(q_norm), dev(k_norm),
                             k_cache, v_cache, slots.to(DEVICE))
    assert got_q.dtype == dtype and got_q.shape == want_q.shape
    for got, want in ((got_q, want_q), (k_cache, k_ref), (v_cache, v_ref)):
        torch.testing.assert_close(got.cpu(), want, atol=atol * want.abs().max().item(), rtol=rtol)
    # Skipped slots leave the cache alone; v is a plain copy (after the clip), so it is exact.
    torch.testing.assert_close(v_cache.cpu(), v_ref, atol=0, rtol=0)


def test_rotary_store_reads_the_qkv_gemm_output_in_place():
    """qkv as a row-strided view (a wider buffer's columns): no copy needed, same result."""
    spec, rotary, _, qkv, positions, slots, (k_old, v_old) = make_case("llama_gqa", torch.float32)
    wide = torch.zeros(qkv.shape[0], qkv.shape[1] + 8, device=DEVICE)
    wide[:, :qkv.shape[1]] = qkv.to(DEVICE)
    k1, v1, k2, v2 = k_old.clone(), v_old.clone(), k_old.to(DEVICE), v_old.to(DEVICE)
    want = rotary_store_torch(qkv, positions, spec, rotary, None, None, k1, v1, slots)
    got = rotary_store(wide[:, :qkv.shape[1]], positions.to(DEVICE), spec, rotary.to(DEVICE), None, None, k2, v2,
                       slots.to(DEVICE))
    torch.testing.assert_close(got.cpu(), want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(k2.cpu(), k1, atol=1e-6, rtol=1e-5)
