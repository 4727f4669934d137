"""Rank 0's side of tensor parallelism: start and watch the workers, broadcast each pass, shut down.

NudgeEngine(..., tensor_parallel_size=N) calls start(): it spawns ranks 1..N-1 with
torch.multiprocessing (or, under torchrun, joins the env:// group; then ranks other than 0 run the
worker loop and then end their process), loads rank 0's shards and returns a TensorParallelGroup whose
`models` the engine uses like load_models()'s. A worker that dies makes the next pass raise
WorkerDiedError (engine_fatal: the async engine turns /health to 503) instead of hanging.
"""
from __future__ import annotations

import atexit
import os
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .. import _core
from ..model.config import load_config
from ..model.model_pair import LoadedModel
from ..model.model_runner import ModelRunner, StepInputs
from ..model.tokenizer import Tokenizer
from . import NUDGER_PLACEMENTS
from .channel import StepChannel
from .group import LaunchSpec, destroy_group, free_tcp_address, init_group, rank_device, under_torchrun
from .shard import load_rank_models
from .worker import EXIT_DONE, exit_worker, run_worker, spawn_main

JOIN_TIMEOUT_S = 10.0     # a worker told to stop has this long to exit before it is terminated, then killed
WATCH_INTERVAL_S = 0.5    # how often the CUDA monitor looks at the workers


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
            self.group.broken = f"{type(e).__name__}: {e}"
            raise WorkerDiedError(f"tensor-parallel pass failed ({self.group.broken}); the engine must be restarted") from e


class TensorParallelGroup:
    def __init__(self, spec: LaunchSpec, procs: list, device: torch.device, tp):
        self.spec = spec
        self.procs = procs                  # spawned workers (empty under torchrun)
        self.device = device
        self.tp = tp
        self.channel = StepChannel(device, tp.group)
        self.broken: str | None = None
        self.models: list[LoadedModel] = []
        self._closed = False
        if procs and device.type == "cuda":
            # gloo fails a collective as soon as a peer's connection closes; NCCL would wait for its
            # watchdog (and then end this process), so a dead worker aborts the group from here.
            threading.Thread(target=self._watch, daemon=True, name="nudge-tp-monitor").start()

    def _watch(self) -> None:
        while not self._closed:
            dead = [r for r, p in enumerate(self.procs, 1) if not p.is_alive()]
            if dead and not self._closed:
                self.broken = self.broken or f"worker rank {dead[0]} died"
                abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
                try:
                    if abort is not None:
                        abort()   # the pass blocked in a collective raises instead of hanging
                except Exception:  # noqa: BLE001
                    pass
                return
            time.sleep(WATCH_INTERVAL_S)

    def check_workers(self) -> None:
        dead = [f"rank {r} (exit code {p.exitcode})" for r, p in enumerate(self.procs, 1) if not p.is_alive()]
        if dead or self.broken is not None:   # a dead worker is the plainest account of a failed collective
            what = "worker " + ", ".join(dead) + " died" if dead else self.broken
            self.broken = self.broken or what
            raise WorkerDiedError(f"tensor-parallel {what}; the engine must be restarted")

    def close(self) -> None:
        """Stops the workers (a stop message, then terminate, then kill) and leaves the group. Idempotent."""
        if self._closed:
            return
        self._closed = True
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
        destroy_group()


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
    procs = []
    if under_torchrun(spec.tp_size):
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
        device = rank_device(spec.device, local_rank)
        tp = init_group(spec, rank, "env://", device)
        if rank != 0:
            try:
                run_worker(spec, tp, device)
            finally:
                destroy_group()
            exit_worker(EXIT_DONE)
    else:
        if dist.is_initialized():   # the default group is per process
            raise ValueError("a tensor-parallel engine (or another torch.distributed group) is already running in "
                             "this process: close() it first")
        init_method = free_tcp_address()
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=spawn_main, args=(r, spec, init_method, os.getpid()), daemon=True,
                             name=f"nudge-tp-worker-{r}") for r in range(1, spec.tp_size)]
        for p in procs:
            p.start()
        device = rank_device(spec.device, 0)
        try:
            tp = init_group(spec, 0, init_method, device)
        except BaseException:
            _kill(procs)
            raise
    group = TensorParallelGroup(spec, procs, device, tp)
    atexit.register(group.close)
    try:
        runners = load_rank_models(spec, tp, device)
        paths = [spec.base] + ([spec.nudger] if spec.nudger is not None else [])
        for index, path in enumerate(paths):
            runner = runners[index]
            if index < len(spec.tp_models):
                runner = BroadcastingRunner(runner, index, group)
            group.models.append(LoadedModel(Path(path), runner, Tokenizer(Path(path)),
                                            _core.BlockPool(runner.num_blocks, runner.block_size,
                                                            spec.enable_prefix_caching)))
    except BaseException:
        group.broken = "loading failed"
        group.close()
        raise
    return group


def _kill(procs: list) -> None:
    for p in procs:
        p.kill()
        p.join()
