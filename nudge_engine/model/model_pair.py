"""Loads the models of an engine (base, and the nudger if any): weights, tokenizer, runner, KV pool."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .. import _core
from .errors import ModelFolderError
from .loader import load_causal_lm
from .model_runner import ModelRunner, StepInputs
from .sizing import size_kv_pools
from .tokenizer import Tokenizer


@dataclass
class LoadedModel:
    path: Path
    runner: ModelRunner
    tokenizer: Tokenizer
    pool: _core.BlockPool
    graphs: object = None  # GraphRunner for decode-shaped passes, or None (eager)
    draft_graphs: object = None  # the nudger's DraftGraphs (draft_graph.py): passes 2..k as one graph, or None

    def __post_init__(self):
        if self.tokenizer.vocab_size > self.config.vocab_size:   # its last ids would index past the embedding
            raise ModelFolderError(f"{self.path}: the tokenizer has {self.tokenizer.vocab_size} tokens, more than the "
                                   f"model's vocab_size ({self.config.vocab_size}): a prompt with one of the others "
                                   "would fail every request batched with it")

    @property
    def config(self):
        return self.runner.config

    def forward(self, seqs: list, num_new: list[int], rows=None, override=None) -> torch.Tensor:
        """One pass over `num_new[i]` new tokens of each sequence; float32 logits at `rows` of the flat
        batch (a list or tensor), by default at each sequence's last new token.
        override: (index [m] or None for all, values [m] int64 on the device): input ids that only the
        device knows (drafts), written over the host's placeholders at those flat positions."""
        batch = _core.build_batch(seqs, num_new, self.runner.block_size)
        key = self.graphs.padded_size(batch) if self.graphs is not None else None
        if key is not None:
            return self.graphs.run(batch, key, None if rows is None else torch.as_tensor(rows, dtype=torch.long),
                                   override)
        inputs = StepInputs.from_batch(batch, self.runner.device)
        if override is not None:
            index, values = override
            inputs.input_ids[slice(None) if index is None else index] = values
        index = torch.from_numpy(batch.logits_indices) if rows is None else torch.as_tensor(rows, dtype=torch.long)
        return self.runner.forward(inputs, index.to(self.runner.device))

    def check_fits(self, role: str, num_prompt_tokens: int, max_new_tokens: int) -> None:
        """ValueError unless a prompt and its longest output fit this model's context and its whole KV
        pool, so a request that can never run is refused at admission instead of failing a step."""
        total = num_prompt_tokens + max_new_tokens
        limit = self.config.max_position_embeddings
        if total > limit:
            raise ValueError(f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_new_tokens}) exceeds the "
                             f"{role} model {self.path.name}'s context of {limit} tokens")
        pool = self.pool
        blocks = -(-total // pool.block_size)
        if blocks > pool.num_blocks:
            raise ValueError(f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_new_tokens}) needs {blocks} KV "
                             f"blocks of {pool.block_size} tokens, more than the {role} model's whole pool "
                             f"({pool.num_blocks} blocks); lower max_tokens or give the engine a larger KV cache")

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.runner.model.parameters())


def load_models(paths: list[Path], device: torch.device, dtype: torch.dtype, *, attention_backend: str,
                block_size: int, kv_cache_bytes: int | None, num_blocks: int | None,
                max_num_batched_tokens: int, enable_prefix_caching: bool = False,
                graph_tokens: int = 0) -> list[LoadedModel]:
    """One LoadedModel per path; every pool gets the same number of blocks (sizing.py says why) and, with
    enable_prefix_caching, its own prefix cache (a block's KV depends on its model, so caches never mix)."""
    loaded = [load_causal_lm(p, device, dtype) for p in paths]
    blocks = num_blocks or size_kv_pools(loaded, device, dtype, block_size, kv_cache_bytes,
                                         max_num_batched_tokens, attention_backend, graph_tokens=graph_tokens)
    return [
        LoadedModel(path, ModelRunner(model, config, device, dtype, blocks, block_size, attention_backend),
                    Tokenizer(path), _core.BlockPool(blocks, block_size, enable_prefix_caching))
        for path, (model, config) in zip(paths, loaded)
    ]
