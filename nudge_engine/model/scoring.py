"""`load_model(path).score(token_id_lists)`: logits for every position, through the paged path."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from .. import _core
from .loader import load_causal_lm, resolve_dtype
from .model_runner import DEFAULT_BLOCK_SIZE, ModelRunner, StepInputs

DEFAULT_SCORING_BLOCKS = 1024


class ScoringModel:
    def __init__(self, runner: ModelRunner):
        self.runner = runner
        self.pool = _core.BlockPool(runner.num_blocks, runner.block_size)
        self.config = runner.config

    def score(self, token_id_lists: Sequence[Sequence[int]], prefill: int | None = None,
              chunk: int | None = None) -> list[torch.Tensor]:
        """Float32 logits [len, vocab] per sequence (row j predicts token j + 1).

        By default each sequence is one prefill. With `prefill` and `chunk`, the first `prefill`
        tokens go in one pass and the rest in passes of `chunk` tokens (all sequences batched per
        pass), exercising decode and k-token verification through the KV cache.
        """
        vocab = self.config.vocab_size
        for i, ids in enumerate(token_id_lists):
            if len(ids) == 0:
                raise ValueError(f"sequence {i} is empty")
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"sequence {i}: token ids {bad[:5]} outside the vocabulary [0, {vocab})")
        seqs = [_core.Sequence(self.pool) for _ in token_id_lists]
        outputs: list[list[torch.Tensor]] = [[] for _ in token_id_lists]
        try:
            for seq, ids in zip(seqs, token_id_lists):
                seq.append(list(ids))
                if not seq.reserve(len(ids)):
                    raise RuntimeError(f"KV pool too small to score {len(ids)} tokens")
            first = prefill if prefill is not None else max(len(ids) for ids in token_id_lists)
            step = chunk if chunk is not None else first
            done = [0] * len(seqs)
            while any(d < len(ids) for d, ids in zip(done, token_id_lists)):
                active = [i for i, ids in enumerate(token_id_lists) if done[i] < len(ids)]
                want = [min(first if done[i] == 0 else step, len(token_id_lists[i]) - done[i]) for i in active]
                batch = _core.build_batch([seqs[i] for i in active], want, self.runner.block_size)
                inputs = StepInputs.from_batch(batch, self.runner.device)
                every_row = torch.arange(inputs.input_ids.shape[0], device=self.runner.device)
                logits = self.runner.forward(inputs, every_row).cpu()
                qsl = batch.query_start_loc
                for j, (i, n) in enumerate(zip(active, want)):
                    outputs[i].append(logits[qsl[j]:qsl[j + 1]])
                    done[i] += n
                    seqs[i].set_num_computed(done[i])
        finally:
            for seq in seqs:
                seq.release()
        return [torch.cat(chunks) for chunks in outputs]


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32",
               attention_backend: str = "auto", num_blocks: int = DEFAULT_SCORING_BLOCKS,
               block_size: int = DEFAULT_BLOCK_SIZE) -> ScoringModel:
    device = torch.device(device)
    torch_dtype = resolve_dtype(dtype)
    model, config = load_causal_lm(path, device, torch_dtype, progress=False)
    return ScoringModel(ModelRunner(model, config, device, torch_dtype, num_blocks, block_size, attention_backend))
