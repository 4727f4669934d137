"""One rank's models: its tensor-parallel shards (and, on rank 0, a nudger kept whole), its KV pools.

Every rank sizes its own pools (model/sizing.py, on its own GPU); the block counts are then made
equal with an all-reduce MIN, since rank 0's one C++ scheduler hands out the same block ids everywhere.
The sizing keeps room for the largest captured pass when graphs are on (graph_reserve_tokens).

Graphs per rank: every rank captures the decode graphs of the sharded models in the same order (base,
then a tensor-parallel nudger; sizes largest first), since the capture's warm-up and captured passes
run the shards' collectives; rank 0's whole nudger is captured last, alone. On CUDA the NCCL
communicator exists before any capture (the block-count all-reduce below is its first collective),
and torch.cuda.graph captures on its side stream, which NCCL collectives allow.
"""
from __future__ import annotations

import logging
from dataclasses import replace

import torch
import torch.distributed as dist

from ..layers.parallel import SINGLE, TensorParallel
from ..model.graph_runner import GraphRunner, graph_query_lens, graph_reserve_tokens, make_graph_runner
from ..model.config import ModelConfig
from ..model.families import CausalLM
from ..model.loader import load_causal_lm, resolve_dtype
from ..model.model_runner import ModelRunner
from ..model.sizing import size_kv_pools
from .group import LaunchSpec

log = logging.getLogger("nudge_engine")


def shard_config(model: CausalLM, config: ModelConfig) -> ModelConfig:
    """The config this rank's runner sizes its KV cache by: its own query and KV heads."""
    spec = model.model.layers[0].self_attn.spec
    return replace(config, num_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads)


def load_rank_models(spec: LaunchSpec, tp: TensorParallel, device: torch.device) -> dict[int, ModelRunner]:
    """-> model index in the engine (0 base, 1 nudger) -> this rank's runner of it."""
    dtype = resolve_dtype(spec.dtype)
    paths = {i: (p, tp) for i, p in enumerate(spec.tp_models)}
    if spec.nudger is not None and spec.nudger_placement == "rank0" and tp.rank == 0:
        paths[1] = (spec.nudger, SINGLE)
    loaded = {}
    for index, (path, shard) in sorted(paths.items()):
        model, config = load_causal_lm(path, device, dtype, progress=tp.rank == 0, tp=shard)
        loaded[index] = (model, shard_config(model, config))
    # Warm-up passes of the sharded models run their collectives on every rank in the same order
    # (base first); the rank-0-only nudger comes last.
    blocks = spec.num_blocks or size_kv_pools(list(loaded.values()), device, dtype, spec.block_size,
                                              spec.kv_cache_bytes, spec.max_num_batched_tokens, spec.attention_backend,
                                              graph_tokens=graph_reserve_tokens(spec.graph_mode, spec.max_num_seqs,
                                                                                spec.num_models, spec.draft_tokens))
    agreed = tp.all_reduce(torch.tensor([blocks], dtype=torch.long, device=device), op=dist.ReduceOp.MIN)
    return {index: ModelRunner(model, config, device, dtype, int(agreed.item()), spec.block_size, spec.attention_backend)
            for index, (model, config) in loaded.items()}


def attach_rank_graphs(spec: LaunchSpec, runners: dict[int, ModelRunner], tp: TensorParallel,
                       device: torch.device) -> dict[int, GraphRunner | None]:
    """-> model index -> this rank's captured decode passes of it (None: eager), in the same order on every rank."""
    lens = graph_query_lens(spec.num_models, spec.draft_tokens)
    roles = ("base", "nudger")
    graphs = {index: make_graph_runner(runner, spec.graph_mode, spec.max_num_seqs, lens[index],
                                       runner.config.max_position_embeddings, f"{roles[index]} (rank {tp.rank})")
              for index, runner in sorted(runners.items())}   # sharded models first: base 0, a tensor nudger 1
    if spec.graph_mode != "eager":
        _log_capture(graphs, tp, device)
    return graphs


def _log_capture(graphs: dict, tp: TensorParallel, device: torch.device) -> None:
    """Rank 0 logs every rank's capture time and graph memory (the workers' own logs are not shown)."""
    captured = [g for g in graphs.values() if g is not None]
    mine = torch.tensor([[sum(g.capture_seconds for g in captured),
                          max((g.capture_impl.memory_bytes() for g in captured), default=0) / 2**20]],
                        dtype=torch.float64, device=device)   # [1, 2]: seconds, MiB (a rank's graphs share a pool)
    every = tp.all_gather_last(mine).view(tp.size, 2).tolist()
    if tp.rank == 0:
        log.info("decode graphs captured per rank: %s",
                 ", ".join(f"rank {r}: {s:.2f} s, {m:.1f} MiB" for r, (s, m) in enumerate(every)))
