"""store_kv (Triton) equals store_kv_torch. CPU: TRITON_INTERPRET=1; NUDGE_TEST_DEVICE=cuda: GPU."""
import os

import torch

DEVICE = os.environ.get("NUDGE_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE == "cpu":
    # Before triton decorates any kernel: on the CPU the interpreter is the only way to run them.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("triton")
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("NUDGE_TEST_DEVICE=cuda but no CUDA device", allow_module_level=True)

from nudge_engine.kernels.store_kv import store_kv  # noqa: E402
from nudge_engine.layers.attention_metadata import NO_SLOT  # noqa: E402
from nudge_engine.layers.attention_torch import store_kv_torch  # noqa: E402

# (key dtype, cache dtype, atol, rtol): same dtype is a plain copy, so exact; float32 into a
# bfloat16 cache rounds, and the interpreter truncates where CUDA rounds to nearest: one ulp.
DTYPES = [
    (torch.float32, torch.float32, 0.0, 0.0),
    (torch.bfloat16, torch.bfloat16, 0.0, 0.0),
    (torch.float32, torch.bfloat16, 0.0, 2 ** -7),
]

# (num_tokens, num_kv_heads, head_dim, num_blocks, block_size)
SHAPES = [
    (1, 1, 16, 1, 4),
    (7, 3, 16, 5, 4),
    (33, 2, 64, 6, 16),
    (12, 8, 128, 3, 8),
]


@pytest.mark.parametrize("key_dtype,cache_dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("num_tokens,num_kv_heads,head_dim,num_blocks,block_size", SHAPES)
@pytest.mark.parametrize("strided", [False, True])
def test_store_kv_matches_torch(num_tokens, num_kv_heads, head_dim, num_blocks, block_size,
                                key_dtype, cache_dtype, atol, rtol, strided):
    gen = torch.Generator().manual_seed(num_tokens * 131 + head_dim)
    if strided:
        # K and V as views of one fused projection output, as the models produce them.
        kv = torch.randn(num_tokens, 2 * num_kv_heads + 1, head_dim, generator=gen).to(key_dtype)
        key, value = kv[:, :num_kv_heads], kv[:, num_kv_heads:2 * num_kv_heads]
    else:
        key = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(key_dtype)
        value = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(key_dtype)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[torch.rand(num_tokens, generator=gen) < 0.25] = NO_SLOT
    if num_tokens > 2:
        slots[1] = -5  # any negative slot is skipped, as in store_kv_torch
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_old = torch.randn(cache_shape, generator=gen).to(cache_dtype)
    v_old = torch.randn(cache_shape, generator=gen).to(cache_dtype)
    k_ref, v_ref = k_old.clone(), v_old.clone()
    store_kv_torch(key, value, k_ref, v_ref, slots)

    k_cache, v_cache = k_old.to(DEVICE), v_old.to(DEVICE)
    store_kv(key.to(DEVICE), value.to(DEVICE), k_cache, v_cache, slots.to(DEVICE))
    torch.testing.assert_close(k_cache.cpu(), k_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(v_cache.cpu(), v_ref, atol=atol, rtol=rtol)


def test_kernels_package_does_not_import_triton():
    code = "import sys, nudge_engine.kernels; assert 'triton' not in sys.modules, 'triton imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
