"""The batches: dynamic batching for the tokenizer (/encode, /decode) and wide-grid
/generate, which run a batch to completion; the collector forms them.

Requests become `BatchJob`s in a queue keyed by (model, operation, shape): only jobs whose tensors
stack share a batch. The worker, an asyncio task, picks the queue whose oldest job waited
longest, lets the batch fill as the policy says, and hands it to the device
threads; the event loop never runs model work. When a filling batch closes is the policy's
call (`BatchPolicy`, kept apart from the mechanics). One more batch than there are threads waits
ready, so a thread never idles while the loop sends the previous batch's answers.

Admission (service.engine.admission, shared with the generation engines): a bound on the
images queued everywhere (503 past it), a deadline per job (504 when it passes while
queued); jobs whose client went away are dropped before compute, and
out-of-memory splits a batch (engine.oom.split_on_oom). A job's state is its future: queued while its
future is pending and it sits in a queue, finished once the future is done.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import numpy as np
import torch

from ..errors import ServiceError
from ..metrics import Metrics
from .admission import Admission
from .oom import split_on_oom, too_big

log = logging.getLogger("taming.batching")

# A batch that runs alone waits this share of its recent run time for company (see patience)
LONG_BATCH_PATIENCE = 0.1


@dataclass
class BatchPolicy:
    max_batch_size: int
    max_wait: float  # seconds after the first job's arrival
    eager: bool = True  # close early for a lone client

    def patience(self, runs_alone: bool, recent_run_s: float) -> float:
        """How long a batch waits for company after its first job. A batch that runs alone
        costs about the same nearly empty as full, so closing it while answered clients are
        still coming back would make them wait a whole run: it waits a share of a run."""
        if not runs_alone:
            return self.max_wait
        return max(self.max_wait, LONG_BATCH_PATIENCE * recent_run_s)

    def close_early(self, arriving: int, device_busy: bool, last_batch_jobs: int) -> bool:
        """A lone client never waits: nothing on its way, the device idle, and the last batch
        a single request. Under load, requests still in socket buffers count as nothing on
        its way, so closing on that alone would make batches of two or three."""
        return self.eager and arriving <= 0 and not device_busy and last_batch_jobs <= 1

# Batches handed to the device threads beyond one per thread: the next one waits there, ready,
# while the event loop sends the last one's answers. Runners whose batches run long opt out.
PIPELINE_EXTRA = 1


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


@dataclass(eq=False, repr=False)  # a payload can be a large array: no repr by accident
class BatchJob:
    """One request's work in the collector: its payload and the future its handler awaits."""

    runner: Runner
    key: tuple
    payload: Any
    size: int  # images
    arrival: float  # loop.time()
    future: asyncio.Future
    is_gone: Callable[[], Awaitable[bool]] | None = None
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
    max_wait), and closes at once when none is on its way, so a lone client never waits.
    A request is counted from `arrive` (the request layer) to its first `settle` (queued, or
    answered without being queued); its context dict remembers which."""

    __slots__ = ("n",)
    KEY = "arriving"

    def __init__(self) -> None:
        self.n = 0

    def arrive(self, ctx: dict) -> None:
        self.n += 1
        ctx[self.KEY] = True

    def settle(self, ctx: dict) -> None:
        if ctx.pop(self.KEY, False):
            self.n -= 1


class Collector:
    def __init__(self, metrics: Metrics, policy: BatchPolicy, *, device: str = "cpu",
                 admission: Admission | None = None, workers: int = 1,
                 on_thread: Callable[[], None] | None = None,
                 arrivals: Arrivals | None = None) -> None:
        self.metrics = metrics
        self.policy = policy
        self.arrivals = arrivals or Arrivals()
        self.device = device
        self.admission = admission or Admission(metrics)
        self.workers = workers
        self.queued_images = 0  # in this collector's queues (the admission counts every queue)
        self._queues: dict[tuple, _Queue] = {}
        self._closing = False
        self._waiter: asyncio.Future | None = None
        self._waiting_on: _Queue | None = None
        self._task: asyncio.Task | None = None
        self._running: set[asyncio.Future] = set()
        self._batch_s: dict[tuple, float] = {}  # (model, operation) -> recent compute s
        self._last_jobs = 1  # requests in the last batch: 1 looks like a lone client
        self._slots: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = ThreadPoolExecutor(max_workers=workers,
                                          thread_name_prefix=f"taming-{device}",
                                          initializer=on_thread)

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._slots = asyncio.Semaphore(self.workers + PIPELINE_EXTRA)
        self._task = asyncio.create_task(self._work(), name=f"taming-collector-{self.device}")

    async def call(self, fn: Callable, *args: Any) -> Any:
        """Run fn(*args) on a device thread (warm-up)."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def drain(self) -> None:
        """Refuse new jobs; queued and running ones still finish (without waiting for company)."""
        self.admission.drain()
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wake)

    async def close(self) -> None:
        """Drain: finish every queued job, then stop the worker and its threads."""
        self.admission.drain()
        self._closing = True
        self._wake()
        if self._task is not None:
            await self._task
        self._thread.shutdown(wait=True)

    # ---- admission -------------------------------------------------------------------------
    def submit(self, runner: Runner, shape: Any, payload: Any, size: int,
               is_gone: Callable[[], Awaitable[bool]] | None = None,
               admitted: bool = False, since: float | None = None) -> BatchJob:
        """Queue a job of `size` images; raises ServiceError 503 when full or draining.

        `admitted`: part of a request the server already accepted (it arrived before
        draining began, or it is the decode of a sampled one): served whatever the queue.
        `since`: when the request arrived (loop.time(); default now): its deadline counts
        from there, the time its body took included.
        """
        self.admission.admit(size, admitted, closing=self._closing and not admitted)
        loop = self._loop
        self.admission.check_time(loop, since)
        now = loop.time()
        key = (runner.model, runner.operation, shape)
        q = self._queues.get(key)
        if q is None:
            q = self._queues[key] = _Queue(key, runner.operation, runner.model)
        job = BatchJob(runner, key, payload, size, now, loop.create_future(), is_gone)
        job.timer = self.admission.deadline(loop, now if since is None else min(since, now),
                                            self._expire, job)
        job.future.add_done_callback(lambda _: self._unqueue(job))
        q.jobs.append(job)
        self._count(q, size)
        if self._waiting_on is None or self._waiting_on is q:
            self._wake()  # idle, or filling this queue: check whether the batch can close
        return job

    async def result(self, job: BatchJob) -> dict[str, np.ndarray]:
        """The job's arrays; a cancelled handler cancels its future, which unqueues it."""
        return await job.future

    def _count(self, q: _Queue, n: int) -> None:
        q.images += n
        self.queued_images += n
        if n > 0:
            self.admission.enter(n)
        else:
            self.admission.leave(-n)
        # inc, not set: /generate's series also counts the generation engine's waiting images
        self.metrics.queue_depth.labels(q.operation, q.model).inc(n)

    def _unqueue(self, job: BatchJob) -> None:
        """The job's future is done: if it still waits in its queue, it leaves it."""
        if job.timer is not None:
            job.timer.cancel()
        q = self._queues[job.key]
        if job in q.jobs:  # (not remove()'s ValueError: its message is the job's repr)
            q.jobs.remove(job)
            self._count(q, -job.size)

    def _expire(self, job: BatchJob) -> None:
        self._reject(job, "deadline", self.admission.timed_out(
            f"the request did not run within {self.admission.timeout_s:g} s of its arrival"))

    def _reject(self, job: BatchJob, reason: str, exc: BaseException) -> None:
        if not job.future.done():
            self.admission.reject(reason)
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
        policy = self.policy
        while True:
            await self._slots.acquire()  # at most workers + PIPELINE_EXTRA batches handed over
            q = self._oldest()
            if q is None or (self._running and _runs_alone(q)):
                self._slots.release()
                if q is None and self._closing:
                    break
                await self._sleep(None)  # until a job arrives or a batch comes back
                continue
            head = q.jobs[0]
            patience = policy.patience(_runs_alone(q), self._batch_s.get(q.key[:2], 0.0))
            self._waiting_on = q
            try:
                while (q.images < policy.max_batch_size and self.admission.accepting and q.jobs
                       and q.jobs[0] is head):
                    left = head.arrival + patience - loop.time()
                    if left <= 0 or policy.close_early(self.arrivals.n, bool(self._running),
                                                       self._last_jobs):
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

    async def _take(self, q: _Queue) -> list[BatchJob]:
        """Pop up to max_batch_size images of live jobs (an oversized job goes alone)."""
        taken: list[BatchJob] = []
        total = 0
        loop = self._loop
        limit = self.policy.max_batch_size
        while q.jobs:
            job = q.jobs[0]
            if taken and total + job.size > limit:
                break
            q.jobs.popleft()
            self._count(q, -job.size)
            if job.timer is not None:
                job.timer.cancel()
            if job.future.done():  # cancelled by its handler
                continue
            # asking costs about as much as an encode: only jobs that waited a while are asked
            if (job.is_gone is not None and loop.time() - job.arrival >= GONE_CHECK_AFTER_S
                    and await _gone(job)):
                self._reject(job, "client_gone", ServiceError(
                    499, "client_gone", "the client closed the connection"))
                continue
            if job.future.done():  # expired while we asked
                continue
            taken.append(job)
            total += job.size
        return taken

    def _launch(self, q: _Queue, jobs: list[BatchJob]) -> None:
        """Hand a batch to a device thread; its results are delivered by a callback, so the
        worker is free to form the next batch meanwhile."""
        self._last_jobs = len(jobs)
        total = sum(j.size for j in jobs)
        for j in jobs:
            j.batch_size = total
        fut = self._loop.run_in_executor(self._thread, self._timed_compute, jobs)
        self._running.add(fut)
        fut.add_done_callback(lambda f: self._deliver(q, jobs, f))

    def _deliver(self, q: _Queue, jobs: list[BatchJob], fut: asyncio.Future) -> None:
        self._running.discard(fut)
        self._slots.release()
        self._wake()
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
            if j.future.done():
                continue
            if isinstance(r, BaseException):
                if isinstance(r, ServiceError) and r.code == "out_of_memory":
                    self.admission.reject("out_of_memory")
                j.future.set_exception(r)
            else:
                j.future.set_result(r)

    # ---- on the device thread --------------------------------------------------------------
    def _timed_compute(self, jobs: list[BatchJob]) -> tuple[list, float, float]:
        """(results, start, end): the batch's own compute time, without its wait for the
        thread (the batch before it may still be running when it is handed over)."""
        start = time.monotonic()  # the clock of loop.time()
        return self._compute(jobs), start, time.monotonic()

    def _compute(self, jobs: list[BatchJob]) -> list[dict | BaseException]:
        runner = jobs[0].runner
        limit = self.policy.max_batch_size
        with torch.inference_mode():
            batch = runner.collate([j.payload for j in jobs])
            total = sum(j.size for j in jobs)
            pieces: list[tuple[int, int, dict | BaseException]] = []
            for lo in range(0, total, limit):
                pieces += split_on_oom(partial(self._forward, runner, batch), lo,
                                       min(lo + limit, total), partial(self._split, runner),
                                       partial(self._too_big, runner))
        return [_rows_of(pieces, a, a + j.size) for a, j in zip(_offsets(jobs), jobs, strict=True)]

    def _forward(self, runner: Runner, batch: Any, lo: int, hi: int) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        result = runner.run(batch, lo, hi)
        m = self.metrics
        m.batch_duration.labels(runner.operation, runner.model).observe(time.perf_counter() - t0)
        m.batch_size.labels(runner.operation, runner.model).observe(hi - lo)
        return result

    def _split(self, runner: Runner, lo: int, hi: int) -> None:
        self.metrics.oom_splits.labels(runner.operation, runner.model).inc()
        log.warning("out of memory on %d images of %s/%s: splitting", hi - lo, runner.model,
                    runner.operation)

    @staticmethod
    def _too_big(runner: Runner, e: BaseException) -> ServiceError:
        return too_big(runner.model, runner.operation)


GONE_CHECK_AFTER_S = 0.05


def _runs_alone(q: _Queue) -> bool:
    """The runner of q's jobs opted out of pipelining (see Runner.pipelined)."""
    return not getattr(q.jobs[0].runner, "pipelined", True)


async def _gone(job: BatchJob) -> bool:
    try:
        return await job.is_gone()
    except Exception:  # cannot tell: compute it
        log.debug("disconnect check failed", exc_info=True)
        return False


def _offsets(jobs: list[BatchJob]) -> list[int]:
    out, at = [], 0
    for j in jobs:
        out.append(at)
        at += j.size
    return out


def _rows_of(pieces: list[tuple[int, int, Any]], a: int, b: int) -> dict | BaseException:
    """Rows [a, b) of a batch computed in pieces: their arrays, or the first piece's error."""
    parts = [(lo, hi, r) for lo, hi, r in pieces if lo < b and hi > a]
    for _, _, r in parts:
        if isinstance(r, BaseException):
            return r
    if len(parts) == 1:
        lo, _, r = parts[0]
        return {k: v[a - lo: b - lo] for k, v in r.items()}
    return {k: np.concatenate([r[k][max(a, lo) - lo: min(b, hi) - lo] for lo, hi, r in parts])
            for k in parts[0][2]}
