"""The queue limit of the async engine (engine/async_engine.py): how many engine requests it takes.

The engine runs at most `max_running` (max_num_seqs) requests at once; `max_queue` more may wait
behind them. A group of n is refused (QueueFullError, a 503) when the requests admitted and not yet
ended, plus its n, would pass `max_running + max_queue`, unless nothing at all is admitted (a group
larger than the whole limit still runs alone). The count is exact: taken on the event loop at submit,
given back by the engine thread the moment a request ends (finished, failed, aborted or refused).
"""
from __future__ import annotations

import threading

from .async_errors import QueueFullError


class Admission:
    def __init__(self, max_running: int, max_queue: int):
        self.max_running = max_running
        self.max_queue = max_queue
        self.count = 0                      # engine requests admitted and not yet ended
        self._lock = threading.Lock()       # taken on the event loop, given back on the engine thread

    def take(self, n: int) -> None:
        """n places, or QueueFullError."""
        limit = self.max_running + self.max_queue
        with self._lock:
            if not self.count or self.count + n <= limit:
                self.count += n
                return
            admitted = self.count
        raise QueueFullError(
            f"the server is busy: {admitted} requests are running or waiting, the most it takes is {limit} "
            f"(--max-num-seqs {self.max_running} running + --max-queue {self.max_queue} waiting)"
            + (f"; this request adds {n}" if n > 1 else "") + "; retry later")

    def give_back(self, n: int) -> None:
        with self._lock:
            self.count -= n
