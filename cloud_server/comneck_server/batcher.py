"""Dynamic batching of the gateway's model work, in the manner of Triton's dynamic batcher.

All model work runs on one thread (:mod:`comneck_server.gateway` says why). Requests reach it
decoded and wait in a queue. The thread takes the oldest one and lets others join it until the
batch holds ``max_batch`` items or the oldest has waited ``max_wait_s``. Then it runs them as one
batch (:meth:`comneck.pipeline.Pipeline.run_batch`: one neck + CLIP-tail pass, one backend call
per backend and task). Other model work (a lazy backend's loading, a support-set piece, the
warm-up) queues as an exclusive job in arrival order, and no batch reaches past one.

Written here rather than taken from a serving framework: the batch is formed from our own
requests, and the model thread must stay this process's only one (Triton and Ray Serve bring
their own process and thread models).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

from comneck.pipeline import Answer, Request

T = TypeVar("T")
RunBatch = Callable[[Sequence[Request]], Sequence["list[Answer] | Exception"]]


@dataclass(frozen=True)
class BatchInfo:
    """How a request was batched: ``size`` items in its batch, ``wait_ms`` the batcher spent
    collecting them, ``queued_ms`` from this request's arrival to the batch's start."""

    size: int
    wait_ms: float
    queued_ms: float


@dataclass
class _Job:
    future: Future
    arrived: float
    request: Request | None = None  # batchable
    work: Callable[[], Any] | None = None  # exclusive

    @property
    def items(self) -> int:
        return len(self.request.prompts) if self.request is not None else 0


class Batcher:
    """One model thread that runs queued requests in dynamic batches and exclusive jobs in order; thread-safe."""

    def __init__(self, run_batch: RunBatch, max_batch: int = 8, max_wait_s: float = 0.01,
                 on_batch: Callable[[int], None] | None = None) -> None:
        self.run_batch, self.max_batch, self.max_wait_s = run_batch, max_batch, max_wait_s
        #: told each batch's size (items) as it starts: the gateway's metrics
        self.on_batch = on_batch
        self._queue: deque[_Job] = deque()
        self._ready = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="comneck-model", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Items queued, not yet running."""
        with self._ready:
            return sum(job.items for job in self._queue)

    def submit(self, request: Request) -> "Future[tuple[list[Answer], BatchInfo]]":
        """Queue ``request`` (decoded or not) to be answered in a batch; cancel the future to drop it
        while it waits (it is then never computed)."""
        return self._put(_Job(Future(), time.perf_counter(), request=request))

    def call(self, work: Callable[[], T]) -> "Future[tuple[T, float]]":
        """Run ``work`` alone on the model thread after what is queued before it; (its result, the
        perf_counter time it started)."""
        return self._put(_Job(Future(), time.perf_counter(), work=work))

    def close(self) -> None:
        """Take nothing new, finish what is queued, stop the thread."""
        with self._ready:
            self._closed = True
            self._ready.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def _put(self, job: _Job) -> Future:
        with self._ready:
            if self._closed:
                raise RuntimeError("the gateway is shutting down")
            self._queue.append(job)
            self._ready.notify_all()
        return job.future

    def _loop(self) -> None:
        while True:
            with self._ready:
                while not self._queue and not self._closed:
                    self._ready.wait()
                if not self._queue:
                    return
                first = self._queue.popleft()
            if first.work is not None:
                self._run_exclusive(first)
            else:
                picked = time.perf_counter()
                self._run(self._collect(first), picked)

    def _collect(self, first: _Job) -> list[_Job]:
        """``first`` and the requests that join it: up to ``max_batch`` items, until ``first`` has
        waited ``max_wait_s``, never past an exclusive job."""
        batch, items = [first], first.items
        until = first.arrived + self.max_wait_s
        with self._ready:
            while items < self.max_batch:
                if self._queue:
                    head = self._queue[0]
                    if head.request is None or items + head.items > self.max_batch:
                        break
                    batch.append(self._queue.popleft())
                    items += head.items
                    continue
                left = until - time.perf_counter()
                if left <= 0 or self._closed:
                    break
                self._ready.wait(left)
        return batch

    def _run(self, batch: list[_Job], picked: float) -> None:
        jobs = [job for job in batch if job.future.set_running_or_notify_cancel()]  # drop the cancelled
        if not jobs:
            return
        started = time.perf_counter()
        size = sum(job.items for job in jobs)
        if self.on_batch is not None:
            self.on_batch(size)
        try:
            outcomes = self.run_batch([job.request for job in jobs])  # type: ignore[misc]
        except Exception as exc:  # noqa: BLE001 - a failure of the shared pass is every request's
            for job in jobs:
                job.future.set_exception(exc)
            return
        for job, outcome in zip(jobs, outcomes):
            if isinstance(outcome, Exception):
                job.future.set_exception(outcome)
            else:
                job.future.set_result((outcome, BatchInfo(size, (started - picked) * 1e3, (started - job.arrived) * 1e3)))

    @staticmethod
    def _run_exclusive(job: _Job) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        started = time.perf_counter()
        try:
            job.future.set_result((job.work(), started))  # type: ignore[misc]
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, who raises it
            job.future.set_exception(exc)
