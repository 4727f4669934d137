"""The authors' cached ("local") notebook nudging, re-implemented as the baseline to beat.

NUDGING.md section 1: their cached local version ran slower than the base model alone (2.17 vs
2.43 tok/s, 70B + 7B, HF, batch 1); section 5: it runs the base model one token at a time and
feeds the nudger every token, one forward at a time. This module does exactly that, with
transformers models and their KV caches (past_key_values), batch 1, greedy:

  prefill both prompts (one forward each), then for every emitted token:
      decide it by section 2 (gamma, word starts, the resume rule) from the newest logits,
      feed it to the base model (one forward, one token),
      feed it to the nudger (one forward, one token)   <- even while the base writes

So each output token costs one base forward plus one nudger forward, whoever wrote it. Its
output is section 2's, so it equals the engine's greedy nudged output for the same models
(tests/test_benchmarks.py checks that).

    python -m benchmarks.notebook_nudging --tiny   # prints its output beside the engine's on a tiny pair
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# The notebook passes past_key_values (transformers 5.17 on the GPU box has nothing else); newer
# transformers versions warn that it is deprecated.
warnings.filterwarnings("ignore", message=".*past_key_values.*")

BASE, NUDGER = "base", "nudger"
WORD_START_PREFIXES = ("Ġ", "Ċ", "ĉ", "▁")
WHITESPACE_BYTE_PIECES = ("<0x09>", "<0x0A>", "<0x0D>", "<0x20>")


def word_start_table(folder: str | Path, size: int) -> list[bool]:
    """NUDGING.md section 3, from tokenizer.json; ids past the tokenizer (vocab padding) start no word."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
    special = {tid for tid, t in tok.get_added_tokens_decoder().items() if t.special}
    table = [False] * size
    for piece, tid in tok.get_vocab(with_added_tokens=True).items():
        if tid < size:
            table[tid] = (tid in special or piece.startswith(WORD_START_PREFIXES)
                          or piece in WHITESPACE_BYTE_PIECES or (len(piece) > 0 and piece[0].isspace()))
    return table


def eos_ids_of(model) -> set[int]:
    ids = set()
    for source in (model.generation_config, model.config):
        e = getattr(source, "eos_token_id", None)
        if e is None:
            continue
        ids.update(e if isinstance(e, (list, tuple)) else [e])
    return ids


@dataclass
class NotebookOutput:
    token_ids: list[int]
    sources: list[str]
    start_time: float
    first_token_time: float | None
    finish_time: float
    base_forwards: int
    nudger_forwards: int
    finish_reason: str
    timeline: list[float] = field(default_factory=list)   # time each token was decided

    @property
    def nudged_fraction(self) -> float:
        return sum(s == NUDGER for s in self.sources) / max(len(self.sources), 1)


class NotebookNudging:
    def __init__(self, base_model, nudger_model, word_start: list[bool], eos_ids: set[int]):
        self.base = base_model
        self.nudger = nudger_model
        self.word_start = word_start
        self.eos_ids = set(eos_ids)
        self.device = next(base_model.parameters()).device

    @classmethod
    def from_folders(cls, base: str | Path, nudger: str | Path, device="cpu", dtype=torch.float32,
                     models=None) -> "NotebookNudging":
        """models: already loaded (base, nudger) transformers models, to share them with other rows."""
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
        if models is None:
            models = tuple(AutoModelForCausalLM.from_pretrained(str(f), dtype=dtype).to(device).eval()
                           for f in (base, nudger))
        b, n = models
        size = max(b.config.vocab_size, n.config.vocab_size)
        return cls(b, n, word_start_table(nudger, size), eos_ids_of(b) | eos_ids_of(n))

    @torch.no_grad()
    def _forward(self, model, ids: list[int], cache):
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        out = model(input_ids=x, past_key_values=cache, use_cache=True)
        return out.logits[0, -1].float(), out.past_key_values

    @torch.no_grad()
    def generate(self, base_prompt: list[int], nudger_prompt: list[int] | None, max_tokens: int, gamma: float,
                 resume_on_agreement: bool = True, ignore_eos: bool = False) -> NotebookOutput:
        nudger_prompt = base_prompt if nudger_prompt is None else nudger_prompt
        start = time.perf_counter()
        base_logits, base_cache = self._forward(self.base, base_prompt, None)
        nudger_logits, nudger_cache = self._forward(self.nudger, nudger_prompt, None)
        base_forwards = nudger_forwards = 1
        y: list[int] = []
        sources: list[str] = []
        timeline: list[float] = []
        mode, run = BASE, 0
        finish = "length"
        while len(y) < max_tokens:
            p_b = torch.softmax(base_logits, dim=-1)
            top1, a_b = p_b.max(dim=-1)
            top1, a_b = float(top1), int(a_b)
            if mode == BASE:
                if top1 < gamma:
                    mode, run = NUDGER, 0
                    continue                               # same position: the nudger writes it
                t, src = a_b, BASE
            else:
                t = int(nudger_logits.argmax())
                resume = top1 >= gamma or (resume_on_agreement and a_b == t)
                if run > 0 and self.word_start[t] and resume:
                    mode, t, src = BASE, a_b, BASE
                else:
                    src, run = NUDGER, run + 1
            y.append(t)
            sources.append(src)
            timeline.append(time.perf_counter())
            if not ignore_eos and t in self.eos_ids:
                finish = "stop"
                break
            if len(y) >= max_tokens:
                break
            # The notebook's cost: both models read every token, one forward each.
            base_logits, base_cache = self._forward(self.base, [t], base_cache)
            nudger_logits, nudger_cache = self._forward(self.nudger, [t], nudger_cache)
            base_forwards += 1
            nudger_forwards += 1
        end = time.perf_counter()
        return NotebookOutput(y, sources, start, timeline[0] if timeline else None, end, base_forwards,
                              nudger_forwards, finish, timeline)


def main(argv=None) -> int:
    from benchmarks import pairs, report, workload
    from nudge_engine.engine import NudgeEngine
    from nudge_engine.engine.sampling_params import NudgeParams, SamplingParams

    ap = argparse.ArgumentParser(description="notebook nudging beside the engine on one prompt")
    report.common_args(ap)
    ap.add_argument("--gamma", type=float, default=pairs.PAPER_GAMMA)
    ap.add_argument("--agreement", type=float, default=0.6)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args(argv)
    device, dtype, models = report.resolve_common(args)
    torch_dtype = getattr(torch, dtype)
    pair = pairs.make_pair(models, args.agreement, device, dtype, shrink=args.shrink,
                            work_dir=Path(args.work_dir) if args.work_dir else None)
    engine = NudgeEngine(pair.base, pair.nudger, device=device, dtype=dtype)
    prompt = workload.make_prompts(engine.tokenizer, [24])[0]
    nb = NotebookNudging.from_folders(pair.base, pair.nudger, device, torch_dtype)
    a = nb.generate(prompt, prompt, args.max_tokens, args.gamma)
    b = engine.generate([prompt], SamplingParams(max_tokens=args.max_tokens, temperature=0),
                        NudgeParams(gamma=args.gamma))[0]
    print(json.dumps({"notebook": a.token_ids, "engine": b.token_ids, "equal": a.token_ids == b.token_ids,
                      "sources_equal": a.sources == b.sources, "nudged_fraction": a.nudged_fraction}))
    return 0 if a.token_ids == b.token_ids else 1


if __name__ == "__main__":
    sys.exit(main())
