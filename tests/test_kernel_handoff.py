"""The section-5 walk: handoff_walk (Triton) and handoff_walk_torch (vectorized) both equal a
plain Python walk; handoff_step (stats + walk fused, packed) equals handoff_step_torch.
CPU: TRITON_INTERPRET=1; NUDGE_TEST_DEVICE=cuda: GPU."""
import os

import torch

DEVICE = os.environ.get("NUDGE_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE == "cpu":
    # Before triton decorates any kernel: on the CPU the interpreter is the only way to run them.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402

import pytest  # noqa: E402

from nudge_engine.pairing.handoff_torch import (  # noqa: E402
    BASE, NO_SOURCE, NO_TOKEN, NUDGE, SRC_BASE, SRC_NUDGER,
    handoff_step_torch, handoff_walk_torch, top1_stats_torch,
)

# The interpreter evaluates inf - inf in masked-out lanes; the results are discarded.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def python_walk(argmax, top1, drafts, lo, hi, mode, run, gamma, roa, word_start):
    """NUDGING.md section 5 for one request, written as plainly as the contract reads."""
    accepted, emit, source = 0, NO_TOKEN, {}
    for i in range(lo, hi):
        d, a, t1 = drafts[i], argmax[i], top1[i]
        if mode == BASE:
            if t1 < gamma:
                mode, run = NUDGE, 0
                if d == NO_TOKEN:
                    break                       # the nudger writes this position next round
                source[i], accepted, run = SRC_NUDGER, accepted + 1, 1
            elif d == NO_TOKEN:
                emit = a                        # bonus token
                break
            elif a == d:
                source[i], accepted = SRC_BASE, accepted + 1
            else:
                emit = a                        # correction
                break
        else:
            if d == NO_TOKEN:
                break
            resume = t1 >= gamma or (roa and a == d)
            if run > 0 and word_start[d] and resume:
                mode, run = BASE, 0
                if a == d:
                    source[i], accepted = SRC_BASE, accepted + 1
                else:
                    emit = a
                    break
            else:
                source[i], accepted, run = SRC_NUDGER, accepted + 1, run + 1
    return accepted, emit, mode, run, source


def python_walk_all(argmax, top1, drafts, pos_start, mode, run, gamma, roa, word_start):
    argmax, top1, drafts = argmax.tolist(), top1.float().tolist(), drafts.tolist()
    pos_start, ws = pos_start.tolist(), word_start.bool().tolist()
    num_req = len(pos_start) - 1
    acc, emit, new_mode, new_run = [], [], [], []
    source = [NO_SOURCE] * len(drafts)
    for r in range(num_req):
        a, e, m, n, src = python_walk(argmax, top1, drafts, pos_start[r], pos_start[r + 1], int(mode[r]),
                                      int(run[r]), float(gamma[r]), bool(roa[r]), ws)
        acc.append(a), emit.append(e), new_mode.append(m), new_run.append(n)
        for i, s in src.items():
            source[i] = s
    return (torch.tensor(acc, dtype=torch.int32), torch.tensor(emit, dtype=torch.int64),
            torch.tensor(new_mode, dtype=torch.int32), torch.tensor(new_run, dtype=torch.int32),
            torch.tensor(source, dtype=torch.int8))


def random_walk_case(num_req, vocab, seed, max_k=6):
    """Random requests built to hit every branch: many draft/argmax agreements, word starts,
    gammas of 0 and > 1, and top-1 values exactly equal to gamma."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randint(0, max_k + 1, (num_req,), generator=gen)
    pos_start = torch.zeros(num_req + 1, dtype=torch.int32)
    pos_start[1:] = (k + 1).cumsum(0)
    num_pos = int(pos_start[-1])
    argmax = torch.randint(0, vocab, (num_pos,), generator=gen)
    drafts = torch.randint(0, vocab, (num_pos,), generator=gen)
    agree = torch.rand(num_pos, generator=gen) < 0.6
    drafts = torch.where(agree, argmax, drafts)
    drafts[pos_start[1:].long() - 1] = NO_TOKEN
    gamma = torch.rand(num_req, generator=gen)
    special = torch.rand(num_req, generator=gen)
    gamma = torch.where(special < 0.1, torch.zeros_like(gamma), gamma)
    gamma = torch.where((special >= 0.1) & (special < 0.2), torch.full_like(gamma, 1.5), gamma)
    gamma = torch.where((special >= 0.2) & (special < 0.3), torch.full_like(gamma, 0.4), gamma)
    req_of_pos = torch.repeat_interleave(torch.arange(num_req), k + 1)
    top1 = torch.rand(num_pos, generator=gen)
    top1 = torch.where(torch.rand(num_pos, generator=gen) < 0.2, gamma[req_of_pos], top1)  # exactly gamma
    mode = torch.randint(0, 2, (num_req,), generator=gen, dtype=torch.int32)
    run = torch.where(mode == NUDGE, torch.randint(0, 3, (num_req,), generator=gen, dtype=torch.int32), 0)
    roa = torch.rand(num_req, generator=gen) < 0.5
    word_start = torch.rand(vocab, generator=gen) < 0.5
    return argmax, top1.float(), drafts, pos_start, mode, run, gamma.float(), roa, word_start


def assert_walk_equal(got, want):
    names = ["num_accepted", "emit_token", "new_mode", "new_run", "accepted_source"]
    for name, g, w in zip(names, got, want):
        g = g.cpu()
        assert g.dtype == w.dtype, (name, g.dtype, w.dtype)
        assert torch.equal(g, w), f"{name}:\n got {g.tolist()}\nwant {w.tolist()}"


def test_python_walk_spot_checks():
    ws = [False, True, True, False]
    # BASE, top1 == gamma: not a nudge; draft agrees -> accepted as base; bonus at the end.
    assert python_walk([1, 2], [0.4, 0.9], [1, NO_TOKEN], 0, 2, BASE, 0, 0.4, True, ws) == \
        (1, 2, BASE, 0, {0: SRC_BASE})
    # BASE, top1 just below gamma: the nudger's draft is taken (run 1), then at a word start
    # with a confident base that disagrees, the base's token is emitted.
    assert python_walk([1, 3], [0.39, 0.9], [0, 2], 0, 2, BASE, 0, 0.4, True, ws) == \
        (1, 3, BASE, 0, {0: SRC_NUDGER})
    # NUDGE with run 0: the first nudged token is always the nudger's, even at a word start.
    assert python_walk([2], [0.99], [2], 0, 1, NUDGE, 0, 0.4, True, ws) == (1, NO_TOKEN, NUDGE, 1, {0: SRC_NUDGER})


@pytest.mark.parametrize("seed", range(3))
def test_walk_torch_matches_python(seed):
    case = random_walk_case(400, vocab=6, seed=seed)
    assert_walk_equal(handoff_walk_torch(*case), python_walk_all(*case))


def test_walk_torch_edge_cases():
    # No requests; k = 0 everywhere.
    empty = (torch.zeros(0, dtype=torch.long), torch.zeros(0), torch.zeros(0, dtype=torch.long),
             torch.zeros(1, dtype=torch.int32), torch.zeros(0, dtype=torch.int32), torch.zeros(0, dtype=torch.int32),
             torch.zeros(0), torch.zeros(0, dtype=torch.bool), torch.zeros(4, dtype=torch.bool))
    out = handoff_walk_torch(*empty)
    assert all(t.numel() == 0 for t in out)
    case = random_walk_case(50, vocab=4, seed=9, max_k=0)
    assert_walk_equal(handoff_walk_torch(*case), python_walk_all(*case))


def core_walk(argmax, top1, drafts, pos_start, mode, run, gamma, roa, word_start):
    """The CPU engine's walk (csrc/handoff_walk.cpp) on the same inputs, as torch tensors."""
    from nudge_engine import _core
    out = _core.handoff_walk(argmax.numpy(), top1.float().numpy(), drafts.numpy(), pos_start.int().numpy(),
                             mode.int().numpy(), run.int().numpy(), gamma.float().numpy(), roa.to(torch.uint8).numpy(),
                             word_start.to(torch.uint8).numpy())
    return tuple(torch.from_numpy(a) for a in out)


@pytest.mark.parametrize("seed,num_req,vocab,max_k", [(0, 400, 6, 6), (1, 100, 3, 8), (2, 64, 50, 0), (3, 1, 5, 4)])
def test_walk_core_matches_python(seed, num_req, vocab, max_k):
    case = random_walk_case(num_req, vocab, seed, max_k)
    assert_walk_equal(core_walk(*case), python_walk_all(*case))


def test_walk_core_top1_exactly_gamma_and_bad_input():
    g = torch.tensor([0.4, 0.4], dtype=torch.float32)
    below = torch.nextafter(g[0], torch.tensor(0.0))
    case = (torch.tensor([3, 7, 3, 7]), torch.stack([g[0], g[0], below, g[0]]),
            torch.tensor([3, NO_TOKEN, 3, NO_TOKEN]), torch.tensor([0, 2, 4], dtype=torch.int32),
            torch.tensor([BASE, BASE], dtype=torch.int32), torch.tensor([0, 0], dtype=torch.int32),
            g, torch.tensor([True, True]), torch.ones(8, dtype=torch.bool))
    assert_walk_equal(core_walk(*case), python_walk_all(*case))
    bad_draft = (case[0], case[1], torch.tensor([3, NO_TOKEN, 9, NO_TOKEN]), *case[3:])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        core_walk(*bad_draft)
    bad_start = (*case[:3], torch.tensor([0, 2, 5], dtype=torch.int32), *case[4:])
    with pytest.raises(ValueError, match="owns positions"):
        core_walk(*bad_start)
    with pytest.raises(ValueError, match="top1 must have shape"):
        core_walk(case[0], case[1][:3], *case[2:])


# The torch tests above run wherever the engine does; the kernel tests below need triton.
needs_kernels = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or (DEVICE == "cuda" and not torch.cuda.is_available()),
    reason="triton missing, or NUDGE_TEST_DEVICE=cuda without a CUDA device")


def handoff_walk(*args, **kwargs):
    from nudge_engine.kernels.handoff_walk import handoff_walk as kernel
    return kernel(*args, **kwargs)


def handoff_step(*args, **kwargs):
    from nudge_engine.kernels.handoff_step import handoff_step as kernel
    return kernel(*args, **kwargs)


def to_dev(case):
    return tuple(t.to(DEVICE) for t in case)


@needs_kernels
@pytest.mark.parametrize("seed,num_req,vocab,max_k", [(0, 300, 6, 6), (1, 100, 3, 8), (2, 64, 50, 0), (3, 1, 5, 4)])
def test_walk_kernel_matches_python(seed, num_req, vocab, max_k):
    case = random_walk_case(num_req, vocab, seed, max_k)
    assert_walk_equal(handoff_walk(*to_dev(case)), python_walk_all(*case))


@needs_kernels
def test_walk_kernel_top1_exactly_gamma():
    # Strict <: top1 == gamma keeps the base (accept its agreeing draft, emit the bonus);
    # one ulp below nudges.
    g = torch.tensor([0.4, 0.4], dtype=torch.float32)
    below = torch.nextafter(g[0], torch.tensor(0.0))
    case = (torch.tensor([3, 7, 3, 7]), torch.stack([g[0], g[0], below, g[0]]),
            torch.tensor([3, NO_TOKEN, 3, NO_TOKEN]), torch.tensor([0, 2, 4], dtype=torch.int32),
            torch.tensor([BASE, BASE], dtype=torch.int32), torch.tensor([0, 0], dtype=torch.int32),
            g, torch.tensor([True, True]), torch.ones(8, dtype=torch.bool))
    want = python_walk_all(*case)
    assert want[0].tolist() == [1, 1] and want[1].tolist() == [7, NO_TOKEN]
    assert want[4].tolist() == [SRC_BASE, NO_SOURCE, SRC_NUDGER, NO_SOURCE]
    assert_walk_equal(handoff_walk(*to_dev(case)), want)
    assert_walk_equal(handoff_walk_torch(*case), want)


def make_step_case(num_req, vocab, seed, dtype):
    """Logits whose argmax agrees with the drafts often and whose top-1 straddles gamma."""
    argmax, _, drafts, pos_start, mode, run, gamma, roa, ws = random_walk_case(num_req, vocab, seed)
    gen = torch.Generator().manual_seed(seed + 100)
    num_pos = drafts.shape[0]
    logits = torch.randn(num_pos, vocab, generator=gen)
    # A peak of random height at the intended argmax: top-1 anywhere from ~1/vocab to ~1.
    peak = torch.rand(num_pos, generator=gen) * 8
    logits[torch.arange(num_pos), argmax] += peak
    return logits.to(dtype), drafts, pos_start, mode, run, gamma, roa, ws


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed,num_req,vocab,num_splits", [(0, 16, 7, None), (1, 10, 300, 3), (2, 1, 1023, None)])
def test_handoff_step_matches_torch(seed, num_req, vocab, num_splits, dtype):
    logits, drafts, pos_start, mode, run, gamma, roa, ws = make_step_case(num_req, vocab, seed, dtype)
    step = handoff_step(*to_dev((logits, drafts, pos_start, mode, run, gamma, roa, ws)), num_splits=num_splits)
    assert step.packed.dtype == torch.int32 and step.packed.device.type == torch.device(DEVICE).type
    got = step.to_host()
    ref = handoff_step_torch(logits, drafts, pos_start, mode, run, gamma, roa, ws).to_host()
    torch.testing.assert_close(got.base_argmax, ref.base_argmax, atol=0, rtol=0)
    torch.testing.assert_close(got.base_top1, ref.base_top1, atol=1e-6, rtol=1e-5)
    # The walk must follow the kernel's own top-1 values: a top-1 within an ulp of gamma may
    # round differently on the GPU (fast exp) than in torch.
    want = python_walk_all(got.base_argmax, got.base_top1, drafts, pos_start, mode, run, gamma, roa, ws)
    assert_walk_equal((got.num_accepted, got.emit_token, got.new_mode, got.new_run, got.accepted_source), want)
    if DEVICE == "cpu":
        assert_walk_equal((got.num_accepted, got.emit_token, got.new_mode, got.new_run, got.accepted_source),
                          (ref.num_accepted, ref.emit_token, ref.new_mode, ref.new_run, ref.accepted_source))

    # gamma set to exactly the top-1 the kernel reports at each request's first position.
    gamma_eq = got.base_top1[pos_start[:-1].long()].clone()
    got2 = handoff_step(*to_dev((logits, drafts, pos_start, mode, run, gamma_eq, roa, ws)),
                        num_splits=num_splits).to_host()
    want2 = python_walk_all(got2.base_argmax, got2.base_top1, drafts, pos_start, mode, run, gamma_eq, roa, ws)
    assert_walk_equal((got2.num_accepted, got2.emit_token, got2.new_mode, got2.new_run, got2.accepted_source), want2)


@pytest.mark.parametrize("seed,num_req,vocab", [(0, 40, 7), (1, 12, 300)])
def test_handoff_step_torch_equals_softmax_and_the_python_walk(seed, num_req, vocab):
    """The CPU engine's step against quantities computed here: float64 softmax, Python argmax."""
    logits, drafts, pos_start, mode, run, gamma, roa, ws = make_step_case(num_req, vocab, seed, torch.float32)
    logits[0, 1] = logits[0, 0] = logits[0].max() + 1            # a tie: the lowest index wins
    got = handoff_step_torch(logits, drafts, pos_start, mode, run, gamma, roa, ws).to_host()
    rows = logits.double().tolist()
    argmax = torch.tensor([max(range(vocab), key=lambda t: (row[t], -t)) for row in rows])
    top1 = torch.softmax(logits.double(), -1).max(-1).values
    assert torch.equal(got.base_argmax, argmax) and int(argmax[0]) == 0
    torch.testing.assert_close(got.base_top1.double(), top1, atol=0, rtol=1e-6)
    want = python_walk_all(argmax, top1, drafts, pos_start, mode, run, gamma, roa, ws)
    assert_walk_equal((got.num_accepted, got.emit_token, got.new_mode, got.new_run, got.accepted_source), want)
    stats = top1_stats_torch(logits, torch.where(drafts == NO_TOKEN, NO_TOKEN, drafts))
    lp = torch.log_softmax(logits.double(), -1)
    has = drafts != NO_TOKEN
    torch.testing.assert_close(stats[3][has].double(), lp[has, drafts[has]], atol=1e-5, rtol=0)
    assert bool((stats[3][~has] == float("-inf")).all())
