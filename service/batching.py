"""The batching engine: per-(model, operation) queues served by one worker per device.

Requests become `Job`s in a queue keyed by (model, operation, shape): only jobs whose tensors
stack (same generate grid, same decode grid) share a batch. The worker, an asyncio task,
picks the queue whose oldest job waited longest, lets the batch fill until it holds
`max_batch_size` images or `max_wait_ms` passed since that job arrived, and runs it on the
device's threads (TAMING_DEVICE_WORKERS, each computing a batch of its own; a generate batch
always runs alone: the transformer has one KV cache) under `torch.inference_mode()`; the event
loop never runs model work. One more batch than there are threads waits ready, so a thread
never idles while the event loop sends the previous batch's answers.

Admission: a bounded queue (`max_queue` images over all queues: 503 past it), a deadline per
job (504 when it passes while queued), jobs whose client went away are dropped before compute,
and out-of-memory errors split the batch in halves and retry each half.

Asking whether a client is still connected costs about as much as encoding its image, so
only jobs that waited at least `gone_check_after_s` (default 50 ms: under overload, when
it pays) are asked.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from .errors import ServiceError
from .metrics import Metrics

log = logging.getLogger("taming.batching")

QUEUED, TAKEN, DONE = "queued", "taken", "done"
# Batches handed to the device threads beyond one per thread: the next one waits there, ready.
# Results come back through the event loop, which may first have dozens of answers to send;
# with one batch at a time the device idled through all of that (45% of the time, /encode at
# 64 clients on 2 cores). Runners whose batches run long (generate) opt out: the gap is small
# beside them, and a batch formed early would be a smaller one.
PIPELINE_EXTRA = 1
LONG_BATCH_PATIENCE = 0.1  # see Engine._patience


class Runner(Protocol):
    """One operation of one model, run on the device thread.

    `collate` turns the jobs' payloads into one batch of rows; `run` computes rows [lo, hi)
    and returns numpy arrays whose first dimension is hi - lo.
    """

    operation: str
    model: str
    pipelined: bool  # may be handed over while other batches compute, and run beside them

    def collate(self, payloads: list[Any]) -> Any: ...

    def run(self, batch: Any, lo: int, hi: int) -> dict[str, np.ndarray]: ...


@dataclass(eq=False)
class Job:
    runner: Runner
    key: tuple
    payload: Any
    size: int  # images
    arrival: float  # loop.time()
    deadline: float
    future: asyncio.Future
    is_gone: Callable[[], Awaitable[bool]] | None = None
    state: str = QUEUED
    timer: asyncio.TimerHandle | None = None
    queue_s: float = 0.0
    compute_s: float = 0.0
    batch_size: int = 0


@dataclass(eq=False)
class _Queue:
    key: tuple
    operation: str
    model: str
    jobs: deque = field(default_factory=deque)
    images: int = 0


class Arrivals:
    """Inference requests received but not yet queued: a filling batch waits for them (up to
    max_wait), and closes at once when none is on its way, so a lone client never waits."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0


def is_oom(e: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(e, oom) or (isinstance(e, RuntimeError) and "out of memory" in str(e))


class Engine:
    def __init__(self, metrics: Metrics, *, device: str = "cpu", max_batch_size: int = 64,
                 max_wait_ms: float = 2.0, max_queue: int = 512, timeout_s: float = 30.0,
                 retry_after_s: int = 1, fault_oom_above: int = 0, torch_threads: int = 0,
                 arrivals: Arrivals | None = None, gone_check_after_s: float = 0.05,
                 workers: int = 1, nice: int = 0) -> None:
        self.metrics = metrics
        self.gone_check_after = gone_check_after_s
        self.arrivals = arrivals  # None: always wait the full max_wait for company
        self.device = device
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self.retry_after = str(retry_after_s)
        self.fault_oom_above = fault_oom_above  # test hook: fake OOM for batches above this
        self.torch_threads = torch_threads
        self.queued_images = 0
        self.accepting = True
        self.batches_run = 0
        self._queues: dict[tuple, _Queue] = {}
        self._depth: dict[tuple[str, str], int] = {}
        self._closing = False
        self._waiter: asyncio.Future | None = None
        self._waiting_on: _Queue | None = None
        self._task: asyncio.Task | None = None
        self._running: set[asyncio.Future] = set()
        self._batch_s: dict[tuple, float] = {}  # (model, operation) -> recent compute s
        self._last_jobs = 1  # requests in the last batch: 1 looks like a lone client
        self._slots: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.workers = workers
        self.nice = nice
        self._thread = ThreadPoolExecutor(max_workers=workers,
                                          thread_name_prefix=f"taming-{device}",
                                          initializer=self._init_thread)

    # ---- lifecycle -------------------------------------------------------------------------
    def _init_thread(self) -> None:
        if self.nice:
            self._lower_priority()
        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)

    def _lower_priority(self) -> None:
        """Raise this model thread's niceness by `nice` (Linux: niceness is per thread), so
        that the event loop gets a core first whenever it has work."""
        tid = threading.get_native_id()
        try:
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid)
                                                     + self.nice))
        except (AttributeError, OSError) as e:  # no setpriority on this platform
            log.warning("model thread priority left as is: %s", e)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._slots = asyncio.Semaphore(self.workers + PIPELINE_EXTRA)
        self._task = asyncio.create_task(self._work(), name=f"taming-worker-{self.device}")

    async def call(self, fn: Callable, *args: Any) -> Any:
        """Run fn(*args) on the device thread (warm-up, tests)."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def drain(self) -> None:
        """Refuse new jobs; queued and running ones still finish (without waiting for company)."""
        self.accepting = False
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wake)

    async def close(self) -> None:
        """Drain: finish every queued job, then stop the worker and its thread."""
        self.accepting = False
        self._closing = True
        self._wake()
        if self._task is not None:
            await self._task
        self._thread.shutdown(wait=True)

    # ---- admission -------------------------------------------------------------------------
    def submit(self, runner: Runner, shape: Any, payload: Any, size: int,
               is_gone: Callable[[], Awaitable[bool]] | None = None,
               admitted: bool = False) -> Job:
        """Queue a job of `size` images; raises ServiceError 503 when full or draining.

        `admitted`: the request arrived before draining began, so it is still served.
        """
        if self._closing or not (self.accepting or admitted):
            self.metrics.rejected.labels("draining").inc()
            raise ServiceError(503, "draining", "the server is shutting down",
                               {"Retry-After": self.retry_after})
        self.check_room(size)
        loop = self._loop
        now = loop.time()
        key = (runner.model, runner.operation, shape)
        q = self._queues.get(key)
        if q is None:
            q = self._queues[key] = _Queue(key, runner.operation, runner.model)
        job = Job(runner, key, payload, size, now, now + self.timeout_s, loop.create_future(),
                  is_gone)
        job.timer = loop.call_at(job.deadline, self._expire, job, q)
        q.jobs.append(job)
        self._count(q, size)
        if self._waiting_on is None or self._waiting_on is q:
            self._wake()  # idle, or filling this queue: check whether the batch can close
        return job

    def check_room(self, size: int = 1) -> None:
        """503 when the queue cannot take `size` more images (one job may always run alone).

        Handlers call it before parsing and decoding a body as well: under a retry storm a
        refusal then costs microseconds, not the work of an answer nobody will get.
        """
        if self.queued_images and self.queued_images + size > self.max_queue:
            self.metrics.rejected.labels("queue_full").inc()
            raise ServiceError(503, "overloaded",
                               f"the queue is full ({self.queued_images} images waiting)",
                               {"Retry-After": self.retry_after})

    async def result(self, job: Job) -> dict[str, np.ndarray]:
        try:
            return await job.future
        except asyncio.CancelledError:
            if job.state == QUEUED:  # the handler was cancelled: never compute it
                self._remove(job)
            raise

    def _count(self, q: _Queue, n: int) -> None:
        q.images += n
        self.queued_images += n
        k = (q.operation, q.model)
        self._depth[k] = self._depth.get(k, 0) + n
        self.metrics.queue_depth.labels(*k).set(self._depth[k])

    def _remove(self, job: Job) -> None:
        q = self._queues[job.key]
        try:
            q.jobs.remove(job)
        except ValueError:
            return
        job.state = DONE
        if job.timer is not None:
            job.timer.cancel()
        self._count(q, -job.size)

    def _expire(self, job: Job, q: _Queue) -> None:
        if job.state != QUEUED:
            return
        self._remove(job)
        self._reject(job, "deadline", ServiceError(
            504, "deadline_exceeded",
            f"the request waited {self.timeout_s:g} s in the queue without running"))

    def _reject(self, job: Job, reason: str, exc: BaseException) -> None:
        job.state = DONE
        self.metrics.rejected.labels(reason).inc()
        if not job.future.done():
            job.future.set_exception(exc)

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def _sleep(self, delay: float | None) -> None:
        """Sleep until woken by submit/close, or until `delay` seconds passed."""
        loop = self._loop
        self._waiter = w = loop.create_future()
        h = loop.call_later(delay, self._wake) if delay is not None else None
        try:
            await w
        finally:
            self._waiter = None
            if h is not None:
                h.cancel()

    # ---- the worker ------------------------------------------------------------------------
    def _oldest(self) -> _Queue | None:
        best = None
        for q in self._queues.values():
            if q.jobs and (best is None or q.jobs[0].arrival < best.jobs[0].arrival):
                best = q
        return best

    async def _work(self) -> None:
        loop = self._loop
        while True:
            await self._slots.acquire()  # at most workers + PIPELINE_EXTRA batches handed over
            q = self._oldest()
            if q is None or (self._running and self._runs_alone(q)):
                self._slots.release()
                if q is None and self._closing:
                    break
                await self._sleep(None)  # until a job arrives or a batch comes back
                continue
            head = q.jobs[0]
            # let the batch fill: until full, or max_wait after its first job arrived. Close
            # early for a lone client: nothing more on its way, the device idle, and the last
            # batch one request. (Under load, requests still in socket buffers count as
            # nothing on its way, and closing early made batches of two or three.)
            self._waiting_on = q
            try:
                while (q.images < self.max_batch_size and self.accepting and q.jobs
                       and q.jobs[0] is head):
                    left = head.arrival + self._patience(q) - loop.time()
                    if left <= 0 or (self.arrivals is not None and self.arrivals.n <= 0
                                     and not self._running and self._last_jobs <= 1):
                        break
                    await self._sleep(left)
            finally:
                self._waiting_on = None
            jobs = await self._take(q) if q.jobs and q.jobs[0] is head else []
            if jobs:
                self._launch(q, jobs)
            else:  # the head expired or was cancelled meanwhile: pick again
                self._slots.release()
        if self._running:
            await asyncio.wait(set(self._running))
        await asyncio.sleep(0)  # let the last delivery callbacks run

    async def _take(self, q: _Queue) -> list[Job]:
        """Pop up to max_batch_size images of live jobs (an oversized job goes alone)."""
        taken: list[Job] = []
        total = 0
        loop = self._loop
        while q.jobs:
            job = q.jobs[0]
            if taken and total + job.size > self.max_batch_size:
                break
            q.jobs.popleft()
            self._count(q, -job.size)
            job.state = TAKEN
            if job.timer is not None:
                job.timer.cancel()
            if job.future.done():  # cancelled by its handler
                job.state = DONE
                continue
            if loop.time() > job.deadline:
                self._reject(job, "deadline", ServiceError(
                    504, "deadline_exceeded",
                    f"the request waited {self.timeout_s:g} s in the queue without running"))
                continue
            if (job.is_gone is not None and loop.time() - job.arrival >= self.gone_check_after
                    and await self._gone(job)):
                self._reject(job, "client_gone", ServiceError(
                    499, "client_gone", "the client closed the connection"))
                continue
            taken.append(job)
            total += job.size
        return taken

    @staticmethod
    async def _gone(job: Job) -> bool:
        try:
            return await job.is_gone()
        except Exception:  # cannot tell: compute it
            log.debug("disconnect check failed", exc_info=True)
            return False

    def _launch(self, q: _Queue, jobs: list[Job]) -> None:
        """Hand a batch to the device thread; its results are delivered by a callback, so
        the worker is free to form the next batch meanwhile."""
        self._last_jobs = len(jobs)
        total = sum(j.size for j in jobs)
        for j in jobs:
            j.batch_size = total
        fut = self._loop.run_in_executor(self._thread, self._timed_compute, jobs)
        self._running.add(fut)
        fut.add_done_callback(lambda f: self._deliver(q, jobs, f))

    @staticmethod
    def _runs_alone(q: _Queue) -> bool:
        """The runner of q's jobs opted out of pipelining (see Runner.pipelined)."""
        return not getattr(q.jobs[0].runner, "pipelined", True)

    def _patience(self, q: _Queue) -> float:
        """How long a batch waits for company after its first job: max_wait, or for a
        runner whose batches run alone (generate) a tenth of its recent batch time if that
        is longer. Such a batch costs about the same for 8 images as for 56 on a CPU, so one
        that closed while the answered clients were still coming back ran nearly empty and
        made them wait for it: at 64 clients, p99 was twice p50."""
        if not self._runs_alone(q):
            return self.max_wait
        return max(self.max_wait, LONG_BATCH_PATIENCE * self._batch_s.get(q.key[:2], 0.0))

    def _deliver(self, q: _Queue, jobs: list[Job], fut: asyncio.Future) -> None:
        self._running.discard(fut)
        self._slots.release()
        self._wake()
        self.batches_run += 1
        try:
            results, start, end = fut.result()
        except Exception as e:  # a bug in a runner: fail this batch, keep serving
            log.error("batch of %s/%s failed", q.model, q.operation, exc_info=e)
            results = [ServiceError(500, "internal_error", f"model error: {type(e).__name__}")] \
                * len(jobs)
            start = end = self._loop.time()
        else:
            old = self._batch_s.get(q.key[:2])
            self._batch_s[q.key[:2]] = end - start if old is None else 0.8 * old + 0.2 * (end - start)
        for j, r in zip(jobs, results, strict=True):
            j.queue_s = start - j.arrival
            j.compute_s = end - start
            self.metrics.queue_wait.labels(q.operation, q.model).observe(j.queue_s)
            j.state = DONE
            if j.future.done():
                continue
            if isinstance(r, BaseException):
                if isinstance(r, ServiceError) and r.code == "out_of_memory":
                    self.metrics.rejected.labels("out_of_memory").inc()
                j.future.set_exception(r)
            else:
                j.future.set_result(r)

    # ---- on the device thread --------------------------------------------------------------
    def _timed_compute(self, jobs: list[Job]) -> tuple[list, float, float]:
        """(results, start, end): the batch's own compute time, without its wait for the
        thread (the batch before it may still be running when it is handed over)."""
        start = time.monotonic()  # the clock of loop.time()
        return self._compute(jobs), start, time.monotonic()

    def _compute(self, jobs: list[Job]) -> list[dict | BaseException]:
        runner = jobs[0].runner
        with torch.inference_mode():
            batch = runner.collate([j.payload for j in jobs])
            total = sum(j.size for j in jobs)
            pieces: list[tuple[int, int, dict | BaseException]] = []
            for lo in range(0, total, self.max_batch_size):
                pieces += self._forward(runner, batch, lo, min(lo + self.max_batch_size, total))
        out: list[dict | BaseException] = []
        offset = 0
        for j in jobs:
            a, b = offset, offset + j.size
            offset = b
            parts = [(lo, hi, r) for lo, hi, r in pieces if lo < b and hi > a]
            failed = [r for _, _, r in parts if isinstance(r, BaseException)]
            if failed:
                out.append(failed[0])
                continue
            arrays = {k: np.concatenate([r[k][max(a, lo) - lo: min(b, hi) - lo]
                                         for lo, hi, r in parts]) if len(parts) > 1
                      else parts[0][2][k][a - parts[0][0]: b - parts[0][0]]
                      for k in parts[0][2]}
            out.append(arrays)
        return out

    def _forward(self, runner: Runner, batch: Any, lo: int, hi: int
                 ) -> list[tuple[int, int, dict | BaseException]]:
        """Rows [lo, hi); on out-of-memory, halves and retries (down to one image)."""
        m = self.metrics
        try:
            if self.fault_oom_above and hi - lo > self.fault_oom_above:
                raise RuntimeError(f"out of memory (injected for a batch of {hi - lo} > "
                                   f"TAMING_FAULT_OOM_ABOVE={self.fault_oom_above})")
            t0 = time.perf_counter()
            result = runner.run(batch, lo, hi)
            m.batch_duration.labels(runner.operation, runner.model).observe(
                time.perf_counter() - t0)
            m.batch_size.labels(runner.operation, runner.model).observe(hi - lo)
            return [(lo, hi, result)]
        except Exception as e:
            if not is_oom(e):
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if hi - lo == 1:
                log.error("out of memory on a single image of %s/%s", runner.model,
                          runner.operation)
                return [(lo, hi, ServiceError(503, "out_of_memory",
                                              "out of memory even for one image",
                                              {"Retry-After": self.retry_after}))]
            m.oom_splits.labels(runner.operation, runner.model).inc()
            mid = (lo + hi) // 2
            log.warning("out of memory on %d images of %s/%s: splitting", hi - lo,
                        runner.model, runner.operation)
            return self._forward(runner, batch, lo, mid) + self._forward(runner, batch, mid, hi)
