"""Dynamic batching: concurrent classify requests share one forward pass.

A request puts its image on a bounded queue and waits on a Future. One worker thread takes the
first waiting image, gathers more for up to `wait_ms` (at most `max_batch` in all), runs the model
once on the stack and hands each request its row. With wait_ms = 0 (the server's default) it takes
only the images already waiting: a lone request never waits for company, and under load the
requests that arrive while one batch runs make up the next. A full queue refuses new work at once
(the app answers 503) rather than letting latency grow without bound.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import torch
from torch import Tensor


class QueueFull(Exception):
    """More requests are waiting than the queue holds."""


class Batcher:
    def __init__(self, run_batch: Callable[[Tensor], Tensor], max_batch: int = 32, wait_ms: float = 0.0,
                 max_queue: int = 1024):
        self.run_batch, self.max_batch, self.wait_s = run_batch, max_batch, wait_ms / 1000
        self.queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self.batches = self.items = 0  # counters for /healthz: items / batches is the mean batch size
        self._thread = threading.Thread(target=self._work, name="nnlab-batcher", daemon=True)
        self._thread.start()

    def submit(self, item: Tensor) -> Future:
        """A Future of run_batch's row for `item` (one input without the batch dimension)."""
        future: Future = Future()
        try:
            self.queue.put_nowait((item, future))
        except queue.Full:
            raise QueueFull from None
        return future

    def close(self) -> None:
        self.queue.put((None, None))  # wakes the worker, which then exits
        self._thread.join(timeout=5)

    def _work(self) -> None:
        while True:
            item, future = self.queue.get()
            if future is None:
                return
            batch = [(item, future)]
            deadline = time.perf_counter() + self.wait_s
            while len(batch) < self.max_batch:
                try:
                    item, future = self.queue.get(timeout=max(0.0, deadline - time.perf_counter()))
                except queue.Empty:
                    break
                if future is None:
                    self.queue.put((None, None))  # exit after this batch
                    break
                batch.append((item, future))
            batch = [(x, f) for x, f in batch if f.set_running_or_notify_cancel()]
            if not batch:
                continue
            try:
                out = self.run_batch(torch.stack([x for x, _ in batch]))
            except Exception as e:  # noqa: BLE001 - handed to every waiting request, never lost
                for _, f in batch:
                    f.set_exception(e)
                continue
            self.batches += 1
            self.items += len(batch)
            for row, (_, f) in zip(out, batch):
                f.set_result(row)
