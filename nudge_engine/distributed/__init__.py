"""Tensor parallelism over torch.distributed (NCCL on CUDA, gloo on the CPU); no communication of our own.

The layers shard themselves (layers/parallel.py: column/row-parallel linear, vocabulary-parallel
embedding and head, KV heads split or replicated; the loader slices each checkpoint tensor as it reads
it). What lives here is the process side:

  group.py      process group set-up (each spawned engine its own store and group, or torchrun's env://
                default group), device per rank;
  shard.py      one rank's models: load its shards, size its KV pool (the same block count on every rank),
                capture its decode graphs (the same ones, in the same order, on every rank);
  channel.py    the step broadcast: rank 0 packs each pass's inputs (and which graph, if any, to replay)
                into one buffer, the workers unpack it;
  worker.py     the worker loop of ranks 1..N-1 (and the spawn entry point);
  launch.py     rank 0's side: start and watch the workers, the broadcasting runner, clean shutdown.

The C++ scheduler runs on rank 0 only. The nudger's placement is a setting (NUDGER_PLACEMENTS):
"rank0" (default) keeps the whole nudger on rank 0 alone, so its passes need no communication and
the workers hold no copy of it; "tensor" shards it over the ranks like the base.

May import: model/, layers/, nudge_engine._core. Never engine/, pairing/, server/ (engine/engine.py
imports this package, lazily, when tensor_parallel_size > 1).
"""
NUDGER_PLACEMENTS = ("rank0", "tensor")
DEFAULT_NUDGER_PLACEMENT = "rank0"
