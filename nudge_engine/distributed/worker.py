"""The worker loop of ranks 1..N-1: receive each pass's inputs from rank 0, run this rank's shard.

A worker exits when rank 0 says stop, when a collective fails (rank 0 or a peer died: gloo sees
the closed connection, NCCL its watchdog time-out), or when the process that spawned it is gone.
"""
from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
import threading
import time
import traceback

import torch

from ..layers.parallel import TensorParallel
from .channel import EAGER, OP_STOP, StepChannel
from .group import LaunchSpec, destroy_group, new_group, open_store, rank_device
from .shard import attach_rank_graphs, load_rank_models

log = logging.getLogger("nudge_engine.distributed")

PARENT_POLL_S = 1.0
EXIT_PARENT_GONE = 3
EXIT_FAILED = 1
EXIT_DONE = 0


def run_worker(spec: LaunchSpec, tp: TensorParallel, device: torch.device) -> None:
    """Loads this rank's shards and captures their graphs, then serves passes until rank 0 says stop."""
    runners = load_rank_models(spec, tp, device)
    graphs = attach_rank_graphs(spec, runners, tp, device)
    channel = StepChannel(device, tp)
    while True:
        op, model, step, rows, graph_size = channel.receive()
        if op == OP_STOP:
            return
        if graph_size == EAGER:
            runners[model].forward(step, rows)   # its collectives meet rank 0's
        else:
            graphs[model].replay_step(step, graph_size)   # the graph rank 0 replays, at its padded size


def _exit_when_orphaned(parent_pid: int) -> None:
    """A worker whose engine process was killed outright (no stop, no atexit) ends itself."""
    while True:
        time.sleep(PARENT_POLL_S)
        if os.getppid() != parent_pid:
            os._exit(EXIT_PARENT_GONE)


# A worker is a fresh interpreter that runs only this bootstrap: the engine's sys.path, then
# spawn_main. multiprocessing's "spawn" would first re-run the user's main script (as __mp_main__),
# so a script that builds a tensor-parallel engine at module level, without the
# `if __name__ == "__main__":` guard, would start engines recursively and fail in bootstrapping.
_BOOTSTRAP = ("import pickle, sys; payload = pickle.load(sys.stdin.buffer); sys.path[:] = payload['sys_path']; "
              "from nudge_engine.distributed.worker import spawn_main; spawn_main(*pickle.loads(payload['args']))")


class WorkerProcess:
    """A spawned worker rank: a subprocess running _BOOTSTRAP, with multiprocessing.Process's
    is_alive / exitcode / join / terminate / kill (a negative exit code names the signal)."""

    def __init__(self, rank: int, spec: LaunchSpec, store_port: int):
        self.rank = rank
        self.popen = subprocess.Popen([sys.executable, "-c", _BOOTSTRAP], stdin=subprocess.PIPE)
        payload = {"sys_path": list(sys.path), "args": pickle.dumps((rank, spec, store_port, os.getpid()))}
        try:
            pickle.dump(payload, self.popen.stdin)
            self.popen.stdin.close()
        except OSError:   # it died at once: is_alive() / exitcode say so
            pass

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def exitcode(self) -> int | None:
        return self.popen.poll()

    def is_alive(self) -> bool:
        return self.popen.poll() is None

    def join(self, timeout: float | None = None) -> None:
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def terminate(self) -> None:
        if self.is_alive():
            self.popen.terminate()

    def kill(self) -> None:
        if self.is_alive():
            self.popen.kill()


def spawn_main(rank: int, spec: LaunchSpec, store_port: int, parent_pid: int) -> None:
    """Entry point of a worker that NudgeEngine started as a WorkerProcess."""
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True).start()
    device = rank_device(spec.device, rank)
    if device.type == "cpu":
        torch.set_num_threads(1)   # the ranks share the CPU's cores with rank 0
    tp = None
    try:
        tp = new_group(spec, rank, open_store(spec, rank, store_port), device)
        run_worker(spec, tp, device)
    except Exception:  # noqa: BLE001  report, then end: rank 0 sees the group break
        print(f"nudge_engine tensor-parallel worker {rank} failed:\n{traceback.format_exc()}", file=sys.stderr)
        destroy_group(tp)
        exit_worker(EXIT_FAILED)
    destroy_group(tp)
    exit_worker(EXIT_DONE)


def exit_worker(code: int) -> None:
    """Ends a worker process once its group is gone, skipping the interpreter's teardown: there the
    destructors of gloo's threads have aborted a finished worker now and then (SIGABRT, "terminate
    called without an active exception"), which torchrun reports as a failed rank."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
