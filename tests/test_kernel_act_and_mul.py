"""act_and_mul (Triton) equals act_and_mul_torch for SiLU and GELU-tanh. CPU: TRITON_INTERPRET=1;
NUDGE_TEST_DEVICE=cuda: GPU."""
import os

import torch

DEVICE = os.environ.get("NUDGE_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("NUDGE_TEST_DEVICE=cuda but no CUDA device", allow_module_level=True)

from nudge_engine.kernels.act_and_mul import act_and_mul  # noqa: E402
from nudge_engine.layers.mlp import ACTIVATIONS, act_and_mul_torch  # noqa: E402

# (dtype, atol, rtol), atol in units of the largest |reference| value: the activation is rounded to
# the dtype before the multiply, as in torch, so a half-precision result is at most an ulp or two off.
DTYPES = [
    (torch.float32, 1e-6, 1e-5),
    (torch.bfloat16, 2 ** -7, 2 ** -6),
    (torch.float16, 2 ** -10, 2 ** -9),
]
# (num_tokens, intermediate): odd widths, and one wider than a tile (several programs per row).
SHAPES = [(1, 8), (5, 37), (3, 1500)]


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("num_tokens,inter", SHAPES)
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_act_and_mul_matches_torch(activation, num_tokens, inter, dtype, atol, rtol):
    gen = torch.Generator().manual_seed(num_tokens * 31 + inter)
    # Wide range: the activations' tails (large |gate|) and their curved middle both show up.
    gate_up = (4.0 * torch.randn(num_tokens, 2 * inter, generator=gen)).to(dtype)
    want = act_and_mul_torch(gate_up, activation)
    got = act_and_mul(gate_up.to(DEVICE), activation)
    assert got.dtype == dtype and got.shape == (num_tokens, inter)
    torch.testing.assert_close(got.cpu(), want, atol=atol * want.abs().max().item(), rtol=rtol)


def test_act_and_mul_extremes_and_errors():
    gate = torch.tensor([[-200.0, -30.0, -1e-3, 0.0, 1e-3, 30.0, 200.0, 1.0]])
    gate_up = torch.cat([gate, torch.ones_like(gate)], dim=1)
    for activation in ("silu", "gelu_pytorch_tanh"):
        got = act_and_mul(gate_up.to(DEVICE), activation).cpu()
        assert got.isfinite().all()
        torch.testing.assert_close(got, act_and_mul_torch(gate_up, activation), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="relu"):
        act_and_mul(gate_up.to(DEVICE), "relu")
