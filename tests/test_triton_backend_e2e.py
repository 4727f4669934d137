"""End to end on a tiny pair: the Triton attention backend and fused handoff kernel (run by the
interpreter on the CPU, natively on CUDA) give the same greedy nudged output as the torch path."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from nudge_engine.engine import NudgeEngine  # noqa: E402
from nudge_engine.engine.sampling_params import NudgeParams, SamplingParams  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.mark.parametrize("family", ["llama", "gemma2", "olmo", "olmo2"])
def test_triton_backend_equals_torch_backend(family, tiny_pair, check_pools, draft_tally):
    base, nudger = tiny_pair(family, family, "bytelevel", agreement=0.6)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reference = NudgeEngine(base, nudger, device=device, attention_backend="torch")
    triton_engine = NudgeEngine(base, nudger, device=device, attention_backend="triton")
    check_pools(reference)
    check_pools(triton_engine)
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], [30], [40, 41, 42, 43, 44], [60, 61]]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    # Fixed draft lengths: the fused kernel must see BASE-mode drafts it accepts and ones it corrects.
    nudge = [NudgeParams(gamma=g, draft_tokens=k, adaptive_drafting=False) for g, k in ((0.5, 0), (0.1, 3), (0.5, 1), (0.2, 2))]
    want = reference.generate(prompts, params, nudge)
    tally = draft_tally(triton_engine)
    got = triton_engine.generate(prompts, params, nudge)
    assert tally.accepted >= 1 and tally.rejected >= 1 and tally.base_rounds_with_drafts >= 4, vars(tally)
    assert {"base", "nudger"} <= {s for o in got for s in o.sources}
    assert triton_engine.base.runner.backend.name == "triton"
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert [o.sources for o in got] == [o.sources for o in want]
