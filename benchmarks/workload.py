"""What a benchmark runs: prompts cut from the corpus, gamma for a nudged fraction, transformers
reference models, and forward-pass counting on a loaded engine."""
from __future__ import annotations

from pathlib import Path

import torch

from .pairs import PAPER_NUDGED_FRACTION

# --------------------------------------------------------------------------- prompts
def corpus_text() -> str:
    from nudge_engine.testing.tokenizer_factory import CORPUS_PATH
    return CORPUS_PATH.read_text(encoding="utf-8")


def make_prompts(tokenizer, lengths: list[int], seed: int = 0) -> list[list[int]]:
    """Token-id prompts of the given lengths, cut from the shipped corpus (deterministic)."""
    import random
    ids = tokenizer.encode(corpus_text(), add_special_tokens=False)
    rng = random.Random(seed)
    out = []
    for n in lengths:
        if n > len(ids):
            reps = ids * (n // len(ids) + 1)
            out.append(reps[:n])
            continue
        start = rng.randrange(0, len(ids) - n + 1)
        out.append(ids[start:start + n])
    return out


# --------------------------------------------------------------------------- gamma for a nudged fraction
# Teacher-forced argmax agreement of base and nudger (CPU check, 200 tokens): tiny pair 0.9 -> ~0.7;
# real-depth pairs 0.98 -> ~0.8, 0.95 -> ~0.5, 0.9 -> ~0.2 (32 layers of block noise add up).
DEFAULT_AGREEMENT = {"tiny": 0.9, "real": 0.98}


def nudged_fraction(engine, prompts, max_tokens: int, gamma: float, k: int = 8) -> float:
    from nudge_engine.engine.sampling_params import NudgeParams, SamplingParams
    outs = engine.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
                           NudgeParams(gamma=gamma, draft_tokens=k))
    tokens = sum(len(o.token_ids) for o in outs)
    return sum(s == "nudger" for o in outs for s in o.sources) / max(tokens, 1)


def calibrate_gamma(engine, prompts, max_tokens: int, target: float = PAPER_NUDGED_FRACTION,
                    iters: int = 7) -> tuple[float, list[tuple[float, float]]]:
    """Bisect gamma in [0, 1] for a nudged fraction near `target` (it grows with gamma, not strictly);
    returns the best gamma tried and every (gamma, fraction) tried."""
    lo, hi = 0.0, 1.0
    tried = []
    for _ in range(iters):
        g = round((lo + hi) / 2, 4)
        f = nudged_fraction(engine, prompts, max_tokens, g)
        tried.append((g, f))
        if f < target:
            lo = g
        else:
            hi = g
    best = min(tried, key=lambda gf: (abs(gf[1] - target), gf[0]))
    return best[0], tried


# --------------------------------------------------------------------------- transformers models
def quiet_transformers() -> None:
    import warnings
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*past_key_values.*")


def load_hf(folder: Path, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM
    quiet_transformers()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, device_map=str(device))
    except Exception:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).to(device)
    return model.eval()


def hf_no_eos(model):
    """A generation config that never stops at an end token (fixed output lengths, like ignore_eos)."""
    import copy
    cfg = copy.deepcopy(model.generation_config)
    cfg.eos_token_id = None
    cfg.do_sample = False
    cfg.temperature = None
    cfg.top_p = None
    cfg.top_k = None
    if cfg.pad_token_id is None:
        cfg.pad_token_id = 0
    return cfg


# --------------------------------------------------------------------------- engine forward counting
class ForwardCounter:
    """Counts each engine model's forward passes and the KV it must read (for bytes-moved figures)."""

    def __init__(self, engine):
        self.engine = engine
        self.counts = [dict(calls=0, tokens=0, kv_tokens=0) for _ in engine.models]
        self._orig = []
        for i, m in enumerate(engine.models):
            runner = m.runner
            orig = runner.forward
            self._orig.append((runner, orig))

            def wrapped(step, logits_indices, _orig=orig, _c=self.counts[i]):
                _c["calls"] += 1
                _c["tokens"] += int(step.input_ids.shape[0])
                _c["kv_tokens"] += int(step.max_seq_len) * int(step.seq_lens.shape[0])
                return _orig(step, logits_indices)
            runner.forward = wrapped

    def reset(self) -> None:
        for c in self.counts:
            c.update(calls=0, tokens=0, kv_tokens=0)

    def snapshot(self) -> list[dict]:
        return [dict(c) for c in self.counts]

    def close(self) -> None:
        for runner, orig in self._orig:
            runner.forward = orig
