"""add_norm (Triton) equals add_norm_torch for every family's form of the step between two
sublayers, and as the final norm of gathered rows. CPU: TRITON_INTERPRET=1; NUDGE_TEST_DEVICE=cuda: GPU."""
import os

import torch

DEVICE = os.environ.get("NUDGE_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("NUDGE_TEST_DEVICE=cuda but no CUDA device", allow_module_level=True)

from nudge_engine.kernels.add_norm import add_norm  # noqa: E402
from nudge_engine.layers.norm import NonParametricLayerNorm, RMSNorm, add_norm_torch  # noqa: E402

# (dtype, atol, rtol), atol in units of the largest |reference| value: the kernel rounds where the
# modules round, but its reductions sum in another order, so a half-precision norm may land an ulp
# or two away, and an add that cancels turns that into a large relative error on a small value.
DTYPES = [
    (torch.float32, 1e-6, 1e-5),
    (torch.bfloat16, 2 ** -6, 2 ** -6),
    (torch.float16, 2 ** -9, 2 ** -9),
]


def assert_close(got, want, atol, rtol):
    torch.testing.assert_close(got.cpu(), want, atol=atol * want.abs().max().item(), rtol=rtol)
# (num_tokens, hidden): odd widths leave a masked tail in the row tile.
SHAPES = [(1, 16), (5, 33), (7, 100), (3, 257)]
# form: (post norm, pre norm, with residual)
FORMS = {
    "llama_pre": ("none", "rms", True),
    "llama_first_layer": ("none", "rms", False),
    "olmo_layernorm": ("none", "layer", True),
    "olmo2_post": ("rms", "none", True),
    "gemma2_sandwich": ("gemma", "gemma", True),
    "gemma2_first_layer": ("none", "gemma", False),
}


def make_norm(kind, hidden, dtype, gen):
    if kind == "none":
        return None
    if kind == "layer":
        return NonParametricLayerNorm(hidden, eps=1e-5)
    norm = RMSNorm(hidden, eps=1e-6, unit_offset=kind == "gemma")
    with torch.no_grad():
        norm.weight.copy_(1.0 + 0.5 * torch.randn(hidden, generator=gen))
    return norm.to(dtype)


def to_device(norm):
    return norm.to(DEVICE) if norm is not None else None


def inputs(num_tokens, hidden, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = (3.0 * torch.randn(num_tokens, hidden, generator=gen)).to(dtype)
    residual = (2.0 * torch.randn(num_tokens, hidden, generator=gen) + 0.5).to(dtype)
    return x, residual, gen


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("num_tokens,hidden", SHAPES)
@pytest.mark.parametrize("form", list(FORMS))
def test_add_norm_matches_torch(form, num_tokens, hidden, dtype, atol, rtol):
    post_kind, pre_kind, with_residual = FORMS[form]
    x, residual, gen = inputs(num_tokens, hidden, dtype, seed=num_tokens * 7 + hidden)
    post, pre = make_norm(post_kind, hidden, dtype, gen), make_norm(pre_kind, hidden, dtype, gen)
    residual = residual if with_residual else None
    with torch.no_grad():
        want_out, want_res = add_norm_torch(x, residual, post, pre)
        got_out, got_res = add_norm(x.to(DEVICE), residual.to(DEVICE) if residual is not None else None,
                                    to_device(post), to_device(pre))
    assert got_out.dtype == dtype and got_out.shape == want_out.shape
    assert_close(got_res, want_res, atol, rtol)
    assert_close(got_out, want_out, atol, rtol)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("form", ["llama_pre", "olmo_layernorm", "olmo2_post", "gemma2_sandwich"])
def test_final_norm_of_gathered_rows(form, dtype, atol, rtol):
    """With rows: the last add and the final norm for the logits rows only, in the rows' order."""
    post_kind, pre_kind, _ = FORMS[form]
    pre_kind = "gemma" if post_kind == "gemma" else ("layer" if pre_kind == "layer" else "rms")
    x, residual, gen = inputs(9, 48, dtype, seed=11)
    post, final = make_norm(post_kind, 48, dtype, gen), make_norm(pre_kind, 48, dtype, gen)
    rows = torch.tensor([8, 0, 3, 3], dtype=torch.int64)
    with torch.no_grad():
        want, _ = add_norm_torch(x, residual, post, final, rows)
        got, _ = add_norm(x.to(DEVICE), residual.to(DEVICE), to_device(post), to_device(final), rows.to(DEVICE))
    assert got.shape == (4, 48)
    assert_close(got, want, atol, rtol)


def test_add_norm_strided_input_and_empty_batch():
    x_wide = torch.randn(5, 80)
    x = x_wide[:, 8:72]  # a strided view, as a slice of a wider tensor
    residual = torch.randn(5, 64)
    norm = RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        norm.weight.fill_(0.7)
        want = add_norm_torch(x, residual, None, norm)
        got = add_norm(x.to(DEVICE), residual.to(DEVICE), None, norm.to(DEVICE))
    assert_close(got[0], want[0], 1e-6, 1e-5)
    out, res = add_norm(torch.empty(0, 64, device=DEVICE), torch.empty(0, 64, device=DEVICE), None, norm.to(DEVICE))
    assert out.shape == res.shape == (0, 64)
