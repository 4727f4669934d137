"""Rank 0's side of tensor parallelism: start and watch the workers, broadcast each pass, shut down.

NudgeEngine(..., tensor_parallel_size=N) calls start(): it spawns ranks 1..N-1 as fresh interpreters
(worker.WorkerProcess: the user's main script is not re-run, so no `__main__` guard is needed) over a group of the engine's own (group.py: several engines per process), or,
under torchrun, joins the env:// default group (then ranks other than 0 run the worker loop and then
end their process); it loads rank 0's shards, captures their graphs (as every worker does, in the
same order) and returns a TensorParallelGroup whose `models` the engine uses like load_models()'s.

A worker that dies is noticed by a monitor thread within WATCH_INTERVAL_S, even while the engine is
idle: the group is marked broken (`broken` says which rank, with its exit code), which the async
engine reads between steps to stop serving (/health turns 503 with that reason); on CUDA the monitor
also aborts the group, so a pass blocked in an NCCL collective raises instead of waiting for the
watchdog. The next pass raises WorkerDiedError (engine_fatal) instead of hanging. Under torchrun
there are no spawned workers to watch: torchrun's own agent ends the job when a rank dies.
"""
from __future__ import annotations

import atexit
import os
import threading
import time
from pathlib import Path

import torch

from .. import _core
from ..model.config import load_config
from ..model.model_pair import LoadedModel
from ..model.model_runner import ModelRunner, StepInputs
from ..model.tokenizer import Tokenizer
from . import NUDGER_PLACEMENTS
from .channel import StepChannel
from .group import (LaunchSpec, abort_group, destroy_group, init_default_group, new_group, open_store, rank_device,
                    under_torchrun)
from .shard import attach_rank_graphs, load_rank_models
from .worker import EXIT_DONE, WorkerProcess, exit_worker, run_worker

JOIN_TIMEOUT_S = 10.0     # a worker told to stop has this long to exit before it is terminated, then killed
WATCH_INTERVAL_S = 0.5    # how often the monitor looks at the workers
NO_ROWS = torch.empty(0, dtype=torch.long)   # a graph pass sends no logits rows: the graph computes them all


class WorkerDiedError(RuntimeError):
    """A tensor-parallel worker is gone (or a collective failed): the engine cannot run another pass."""

    engine_fatal = True   # read by engine/async_engine.py: no recovery, /health answers 503


class BroadcastingRunner:
    """Rank 0's runner of a sharded model: each forward first sends the pass to the workers, then runs
    rank 0's shard (same signature as ModelRunner.forward; everything else is the inner runner's)."""

    def __init__(self, inner: ModelRunner, model_index: int, group: "TensorParallelGroup"):
        self.inner = inner
        self.model_index = model_index
        self.group = group

    def __getattr__(self, name: str):
        return getattr(self.__dict__["inner"], name)

    def forward(self, step: StepInputs, logits_indices: torch.Tensor) -> torch.Tensor:
        self.group.check_workers()
        try:
            self.group.channel.send_forward(self.model_index, step, logits_indices)
            return self.inner.forward(step, logits_indices)
        except RuntimeError as e:   # a collective failed or timed out: a peer is gone
            raise self.group.failed(e) from e


class BroadcastingGraphs:
    """Rank 0's captured passes of a sharded model: each replay first tells the workers which graph
    (padded batch size, query length) to replay on which inputs, then replays rank 0's (the
    GraphRunner.run of model/graph_runner.py; everything else is the inner GraphRunner's)."""

    def __init__(self, inner, model_index: int, group: "TensorParallelGroup"):
        self.inner = inner
        self.model_index = model_index
        self.group = group

    def __getattr__(self, name: str):
        return getattr(self.__dict__["inner"], name)

    def run(self, batch, key: tuple[int, int], rows: torch.Tensor | None, override=None) -> torch.Tensor:
        self.group.check_workers()
        try:
            n = self.inner.load(batch, key, override)
            step = self.inner.live_step(key, n, batch.block_tables.shape[1])   # the override's ids included
            self.group.channel.send_forward(self.model_index, step, NO_ROWS, graph_size=key[0])
            self.inner.replay(key, n)
            return self.inner.logits(key, torch.from_numpy(batch.logits_indices) if rows is None else rows)
        except RuntimeError as e:
            raise self.group.failed(e) from e


class TensorParallelGroup:
    def __init__(self, spec: LaunchSpec, procs: list, device: torch.device, tp, store=None):
        self.spec = spec
        self.procs = procs                  # spawned workers (empty under torchrun)
        self.device = device
        self.tp = tp
        self.store = store                  # the engine's own TCPStore (None under torchrun), kept while the group lives
        self.channel = StepChannel(device, tp)
        self.broken: str | None = None
        self.models: list[LoadedModel] = []
        self._closed = False
        if procs:
            threading.Thread(target=self._watch, daemon=True, name="nudge-tp-monitor").start()

    def _watch(self) -> None:
        while not self._closed:
            dead = self._dead_workers()
            if dead and not self._closed:
                self.broken = self.broken or f"worker {dead} died"
                if self.device.type == "cuda":
                    # gloo fails a collective as soon as a peer's connection closes; NCCL would wait for
                    # its watchdog (and then end this process): the pass blocked in it raises instead.
                    abort_group(self.tp)
                return
            time.sleep(WATCH_INTERVAL_S)

    def _dead_workers(self) -> str:
        return ", ".join(f"rank {r} (exit code {p.exitcode})" for r, p in enumerate(self.procs, 1) if not p.is_alive())

    def failed(self, e: RuntimeError) -> WorkerDiedError:
        """A collective failed or timed out (a peer is gone): the group is broken for good."""
        self.broken = f"{type(e).__name__}: {e}"
        return WorkerDiedError(f"tensor-parallel pass failed ({self.broken}); the engine must be restarted")

    def check_workers(self) -> None:
        dead = self._dead_workers()
        if dead or self.broken is not None:   # a dead worker is the plainest account of a failed collective
            what = f"worker {dead} died" if dead else self.broken
            self.broken = self.broken or what
            raise WorkerDiedError(f"tensor-parallel {what}; the engine must be restarted")

    def close(self) -> None:
        """Stops the workers (a stop message, then terminate, then kill) and leaves the group. Idempotent."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)   # a closed engine is not kept alive until the interpreter exits
        if self.broken is None and all(p.is_alive() for p in self.procs):
            try:
                self.channel.send_stop()
            except RuntimeError:
                pass
        for p in self.procs:
            p.join(JOIN_TIMEOUT_S if self.broken is None else 0.1)
        for p in self.procs:
            if p.is_alive():
                p.terminate()
                p.join(JOIN_TIMEOUT_S)
            if p.is_alive():
                p.kill()
                p.join()
        destroy_group(self.tp)
        self.store = None


def check_spec(spec: LaunchSpec) -> None:
    """The errors every rank would hit, as one ValueError before any process starts."""
    if spec.tp_size < 1:
        raise ValueError(f"tensor_parallel_size must be at least 1, got {spec.tp_size}")
    if spec.nudger_placement not in NUDGER_PLACEMENTS:
        raise ValueError(f"nudger_placement {spec.nudger_placement!r} is not one of {NUDGER_PLACEMENTS}")
    device = torch.device(spec.device)
    if device.type == "cuda" and (device.index or 0) + spec.tp_size > torch.cuda.device_count():
        raise ValueError(f"tensor_parallel_size {spec.tp_size} from {device} needs that many GPUs; "
                         f"this machine has {torch.cuda.device_count()}")
    for path in spec.tp_models:
        config = load_config(path)
        for what, total in (("attention heads", config.num_heads), ("MLP intermediate size", config.intermediate_size)):
            if total % spec.tp_size:
                raise ValueError(f"{path}: tensor_parallel_size {spec.tp_size} does not divide its {what} ({total})")
        kv = config.num_kv_heads
        if kv % spec.tp_size and spec.tp_size % kv:
            raise ValueError(f"{path}: tensor_parallel_size {spec.tp_size} neither divides nor is a multiple of "
                             f"its {kv} KV heads")


def start(spec: LaunchSpec) -> TensorParallelGroup:
    check_spec(spec)
    procs, store = [], None
    if under_torchrun(spec.tp_size):
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
        device = rank_device(spec.device, local_rank)
        tp = init_default_group(spec, rank, device)
        if rank != 0:
            try:
                run_worker(spec, tp, device)
            finally:
                destroy_group(tp)
            exit_worker(EXIT_DONE)
    else:
        store = open_store(spec, 0)   # this engine's own: a free port, read back for the workers
        procs = [WorkerProcess(r, spec, store.port) for r in range(1, spec.tp_size)]
        device = rank_device(spec.device, 0)
        try:
            tp = new_group(spec, 0, store, device)
        except BaseException:
            _kill(procs)
            raise
    group = TensorParallelGroup(spec, procs, device, tp, store)
    atexit.register(group.close)
    try:
        runners = load_rank_models(spec, tp, device)
        graphs = attach_rank_graphs(spec, runners, tp, device)
        paths = [spec.base] + ([spec.nudger] if spec.nudger is not None else [])
        for index, path in enumerate(paths):
            runner, captured = runners[index], graphs[index]
            if index < len(spec.tp_models):
                runner = BroadcastingRunner(runner, index, group)
                captured = captured and BroadcastingGraphs(captured, index, group)
            group.models.append(LoadedModel(Path(path), runner, Tokenizer(Path(path)),
                                            _core.BlockPool(runner.num_blocks, runner.block_size,
                                                            spec.enable_prefix_caching), captured))
    except BaseException:
        group.broken = "loading failed"
        group.close()
        raise
    return group


def _kill(procs: list) -> None:
    for p in procs:
        p.kill()
        p.join()
