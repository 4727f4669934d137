"""How many KV blocks each model's pool gets: one budget, the same number of blocks per model.

Both models hold the same output (and similar prompts), so equal token capacity per model
wastes nothing; the budget is split in proportion to each model's bytes per block. On a GPU the
budget is the free memory after a warm-up forward of a full step (activations and logits of
`max_num_batched_tokens` tokens through each model), times a utilization fraction.
"""
from __future__ import annotations

import torch

from .model_runner import (DEFAULT_CPU_KV_BYTES, DEFAULT_GPU_MEMORY_FRACTION, ModelRunner, StepInputs,
                           kv_bytes_per_block)


def _warmup_peak_bytes(runner_args: list[tuple], device: torch.device, dtype: torch.dtype, block_size: int,
                       num_tokens: int, attention_backend: str) -> int:
    """Peak extra memory of one full-size forward per model, measured on the device."""
    peak = 0
    for model, config in runner_args:
        n = min(num_tokens, config.max_position_embeddings)
        blocks = -(-n // block_size)
        runner = ModelRunner(model, config, device, dtype, blocks, block_size, attention_backend)
        i32 = dict(dtype=torch.int32, device=device)
        step = StepInputs(
            input_ids=torch.zeros(n, dtype=torch.long, device=device),
            positions=torch.arange(n, device=device),
            slot_mapping=torch.arange(n, device=device),
            block_tables=torch.arange(blocks, **i32)[None, :],
            query_start_loc=torch.tensor([0, n], **i32),
            seq_lens=torch.tensor([n], **i32),
            max_query_len=n, max_seq_len=n,
        )
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        runner.forward(step, torch.arange(n, device=device))  # logits for every row: the worst case
        torch.cuda.synchronize(device)
        peak = max(peak, torch.cuda.max_memory_allocated(device) - before)
        del runner, step
        torch.cuda.empty_cache()
    return peak


def size_kv_pools(loaded: list[tuple], device: torch.device, dtype: torch.dtype, block_size: int,
                  kv_cache_bytes: int | None, max_num_batched_tokens: int, attention_backend: str = "auto",
                  gpu_memory_fraction: float = DEFAULT_GPU_MEMORY_FRACTION, graph_tokens: int = 0) -> int:
    """loaded: [(model, config)] per model -> blocks per pool. graph_tokens: the largest captured
    decode pass (graph_runner.py); its activations live in the graphs' own pool, so they are
    reserved on top of the eager warm-up's."""
    per_block = sum(kv_bytes_per_block(config, block_size, dtype) for _, config in loaded)
    if kv_cache_bytes is None:
        if device.type == "cuda":
            activations = _warmup_peak_bytes(loaded, device, dtype, block_size, max_num_batched_tokens,
                                             attention_backend)
            if graph_tokens:
                activations += _warmup_peak_bytes(loaded, device, dtype, block_size, graph_tokens, attention_backend)
            free, total = torch.cuda.mem_get_info(device)
            kv_cache_bytes = int(free - (1 - gpu_memory_fraction) * total) - activations
        else:
            kv_cache_bytes = DEFAULT_CPU_KV_BYTES
    blocks = kv_cache_bytes // per_block
    if blocks < 1:
        raise ValueError(f"KV cache budget of {kv_cache_bytes} bytes holds no block ({per_block} bytes per block)")
    return int(blocks)
