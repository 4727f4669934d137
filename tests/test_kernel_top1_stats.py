"""top1_stats (Triton) equals top1_stats_torch. CPU: TRITON_INTERPRET=1; NUDGE_TEST_DEVICE=cuda: GPU."""
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

from nudge_engine.pairing.handoff_torch import NO_TOKEN, top1_stats_torch  # noqa: E402
from nudge_engine.kernels.top1_stats import top1_stats  # noqa: E402

# The interpreter evaluates inf - inf in masked-out lanes; the results are discarded.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

# (dtype, atol, rtol) for lse / token_logprob. max and argmax are always exact: the kernel
# reads the same values and compares them in float32. lse differs only by summation order
# (and by the GPU's fast exp).
DTYPES = [
    (torch.float32, 1e-4, 1e-5),
    (torch.bfloat16, 1e-4, 1e-5),
]

SHAPES = [(1, 1), (4, 1), (3, 1023), (7, 100), (1, 32000), (3, 32000)]


def make_logits(num_pos, vocab, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_pos, vocab, generator=gen) * 4
    tokens = torch.randint(0, vocab, (num_pos,), generator=gen)
    if num_pos > 1:
        tokens[-1] = NO_TOKEN
    if num_pos > 2:
        # All -inf but one: the survivor is the argmax with probability 1.
        x[1] = float("-inf")
        x[1, (vocab * 2) // 3] = -3.0
        tokens[1] = (vocab * 2) // 3
    if vocab > 2 and num_pos > 0:
        # Ties for the max, spread across vocabulary splits: the lowest index must win.
        tied = torch.randperm(vocab, generator=gen)[:5]
        x[0, tied] = x[0].max() + 1.0
    return x.to(dtype), tokens


def check(got, want, atol, rtol):
    g_max, g_arg, g_lse, g_lp = (t.cpu() for t in got)
    w_max, w_arg, w_lse, w_lp = want
    assert g_max.dtype == torch.float32 and g_arg.dtype == torch.int64
    assert g_lse.dtype == torch.float32 and g_lp.dtype == torch.float32
    torch.testing.assert_close(g_max, w_max, atol=0, rtol=0)
    torch.testing.assert_close(g_arg, w_arg, atol=0, rtol=0)
    torch.testing.assert_close(g_lse, w_lse, atol=atol, rtol=rtol, equal_nan=True)
    torch.testing.assert_close(g_lp, w_lp, atol=atol, rtol=rtol, equal_nan=True)


# Forced split counts cover the merge at every shape but the big multi-row one (slow in the
# interpreter, and the automatic plan already splits it).
CASES = [(p, v, s) for p, v in SHAPES for s in (None, 1, 3) if s is None or (p, v) != (3, 32000)]


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("num_pos,vocab,num_splits", CASES)
def test_top1_stats_matches_torch(num_pos, vocab, num_splits, dtype, atol, rtol):
    x, tokens = make_logits(num_pos, vocab, dtype, seed=num_pos * 7 + vocab)
    want = top1_stats_torch(x, tokens)
    got = top1_stats(x.to(DEVICE), tokens.to(DEVICE), num_splits=num_splits)
    check(got, want, atol, rtol)
    top1 = torch.exp(got[0] - got[2]).cpu()
    torch.testing.assert_close(top1, torch.exp(want[0] - want[2]), atol=1e-5, rtol=1e-5, equal_nan=True)


def test_top1_stats_all_neg_inf_row_and_no_tokens():
    x = torch.randn(3, 50)
    x[2] = float("-inf")  # torch: max -inf, argmax 0, lse -inf
    want = top1_stats_torch(x, None)
    got = top1_stats(x.to(DEVICE), None, num_splits=2)
    check(got, want, 1e-5, 1e-5)
    assert torch.isneginf(got[3].cpu()).all()


def test_top1_stats_strided_rows():
    # Logits of the draft positions are often a row-slice of a larger [tokens, vocab] output.
    full = torch.randn(9, 300, dtype=torch.bfloat16)
    x = full[1::2]
    tokens = torch.tensor([5, NO_TOKEN, 299, 0])
    check(top1_stats(x.to(DEVICE), tokens.to(DEVICE)), top1_stats_torch(x, tokens), 1e-4, 1e-5)
