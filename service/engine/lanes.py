"""The generation engine: lanes (threads) stepping their rows, and the bridge to the event loop.

Each transformer gets `lanes` threads, each with its own scheduler (which image holds which
rows) and step runner (those rows on the device). A lane's loop is three calls:
`batch = lane.schedule()` (waiting images into free rows, cancelled ones out, the padded size
and the compaction of the next step, what it will complete), `out = lane.run(batch)` (the
device: one step over the occupied rows and one of the canvas, codes, decodes and previews),
`lane.postprocess(out)` (rows freed, results handed to the event loop). Images join at any
step boundary and leave the moment their last token is picked, so a request never waits for
another one's tail. Lanes pull from one shared queue,
so whichever lane has room takes the next image. A lane decodes its finished images (and
streamed previews) itself, at its own priority: through the tokenizer's batches they queued
behind /encode on niced threads.

A canvas (a grid beyond the model's, for a relative model: models/canvas.py) is one image
that a lane holds beside its rows, one canvas a lane: each turn also runs one step of the
canvas's wavefront, at most half the lane's rows wide while other images wait or sample, so
it never holds a lane to itself. Its rows are streamed as strips as they complete.

Deadlines follow the work. Every request must start sampling within the request timeout of
its arrival (its header), else it leaves with 504 having cost nothing. A training-size
request must also finish by then. A canvas, once started, is judged by its own progress
(`canvas_deadline`): from a request timeout after its start, at each check it gets twice the
time its remaining cells take at the rate it has sampled so far, plus a request timeout for
its decode; it is cut (504) only when a check finds it made no progress since the last one.

The event loop only submits and cancels; lanes report back with `call_soon_threadsafe`.
A job is the single source of truth for its request: which images are done, whether it was
cancelled (client gone, deadline), and the future its handler awaits.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from models.gpt import GPT
from models.sampling import SamplingBatch

from ..errors import ServiceError
from ..metrics import Metrics
from .admission import Admission
from .canvas_runner import CanvasRunner
from .jobs import GenerateJob, Image
from .previews import Patches
from .scheduler import Scheduler
from .step_runner import StepRunner

log = logging.getLogger("taming.generation")

CANVAS_SLACK = 2.0  # a started canvas gets this many times its projected remaining time


def canvas_deadline(now: float, started: float, cells: int, done: int, checked: int,
                    timeout_s: float) -> float | None:
    """When a started canvas request is next checked (loop time), or None: cut it now.

    `cells` in all its images, `done` sampled so far, `checked` sampled at the last check.
    The first check comes a request timeout after its start; at each later one it must have
    progressed, and it gets CANVAS_SLACK times its remaining cells at its measured rate, plus
    a request timeout (its decode, and the jitter of a busy machine)."""
    first = started + timeout_s
    if now < first:
        return first
    if done <= checked:
        return None  # no progress since the last check: stalled
    rate = done / max(now - started, 1e-9)  # cells per second, all its images so far
    return now + CANVAS_SLACK * (cells - done) / rate + timeout_s


@dataclass(eq=False)
class Batch:
    """What one turn of a lane runs, as its scheduler decided it."""

    joined: list[Image]  # seated this turn: their rows take their seeded settings first
    freed: list[int]  # rows of images that left (cancelled), parked before the step
    size: int  # the padded size of the row step (0: no row steps)
    moves: tuple[list[int], list[int]]  # (src, dst): the compaction below `size`
    filtered: bool  # some row uses top-k or top-p
    rows: list[Image]  # images whose token row the step completes (that the loop hears of)
    finished: list[Image]  # images whose grid the step completes
    active: int  # images sampling in rows this step
    canvas: Image | None  # the lane's canvas, which steps this turn too
    canvas_width: int  # at most this many wavefront cells of it


@dataclass(eq=False)
class Output:
    """What a turn produced on the device, for `postprocess` to hand out."""

    batch: Batch
    step_s: float = 0.0
    codes: dict[int, np.ndarray] = field(default_factory=dict)  # by row
    pictures: dict[int, Any] = field(default_factory=dict)  # by id of the image
    canvas_cells: int = 0  # canvas cells sampled
    canvas_s: float = 0.0
    strips: list = field(default_factory=list)  # (row, cells, strip) of the canvas
    canvas_codes: np.ndarray | None = None  # the complete canvas
    canvas_picture: np.ndarray | ServiceError | None = None


class Lane:
    """One thread, one scheduler, one step runner: schedule, run, postprocess, until told to
    stop. It reaches the engine only through its public methods (take, finish, fail)."""

    def __init__(self, engine: GenerationEngine, index: int, runner: StepRunner) -> None:
        self.engine = engine
        self.index = index
        self.runner = runner
        self.scheduler = Scheduler(runner.capacity, runner.sizes, runner.cols, runner.seq_len)
        self.canvas: Image | None = None  # the canvas this lane samples
        self.sampler = None  # its CanvasSampler, once started on this thread
        self.taken: list[Image] = []  # the turn's joining and finishing images: a fault fails them
        self.prepared = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"taming-gen-{engine.name}-{index}",
                                       daemon=True)

    @property
    def active(self) -> list[Image]:
        return self.scheduler.active

    def _prepare(self) -> None:
        e = self.engine
        if e.on_thread is not None:
            e.on_thread()
        with torch.inference_mode():
            eager = self.runner.prepare(e.compile, e.compile_deadline)
        if eager:
            log.warning("%s lane %d: compile budget spent; %d step graphs run eager",
                        e.name, self.index, eager)

    def _run(self) -> None:
        e = self.engine
        try:
            if self.index:  # one lane at a time: the first compiles, the others reuse
                e.lanes[self.index - 1].prepared.wait()
            self._prepare()
        except BaseException as exc:  # start-up reports it; the lane never serves
            e.lane_failed(self, exc)
            return
        finally:
            self.prepared.set()
        e.lane_ready(self)
        with torch.inference_mode():
            while True:
                try:
                    batch = self.schedule()
                    if batch is None:
                        break
                    self.postprocess(self.run(batch))
                except Exception as exc:  # a bug or a device fault: its images fail, not the lane
                    self._fail(exc)

    # ---- the three steps of a turn ---------------------------------------------------------
    def schedule(self) -> Batch | None:
        """Bookkeeping only: cancelled images out, waiting ones into free rows (blocking while
        the lane has nothing to do), the next step's size and compaction, and what it will
        complete. None: the engine is stopping and the lane is empty."""
        s = self.scheduler
        gone = s.cancelled()
        freed = s.release(gone) if gone else []
        changed = bool(gone)  # the active count the metric shows
        if self.canvas is not None and self.canvas.job.cancelled:
            self.canvas = self.sampler = None
            changed = True
        if changed:
            self.engine.count_active()
        taken = self.engine.take(len(s.free), want_canvas=self.canvas is None,
                                 idle=not s.active and self.canvas is None)
        joined, canvas = taken if taken is not None else ([], None)
        self.taken = [*joined, *([canvas] if canvas is not None else [])]
        if taken is None:
            return None
        for im in joined:
            if not s.seat(im):
                raise AssertionError("the engine took more images than the lane has rows for")
            if not im.job.company:
                im.job.company = len(s.active) + len(joined)
        s.admit(joined)
        if canvas is not None:
            self.canvas, self.sampler = canvas, None
        if joined or canvas is not None:
            self.engine.count_active()
        size, src, dst = s.compact() if s.active else (0, [], [])
        rows, finished = s.advance() if s.active else ([], [])
        width = 0
        if self.canvas is not None:  # half the rows wide while other images wait or sample
            busy = s.active or self.engine.waiting
            width = max(1, self.runner.capacity // 2) if busy else self.runner.capacity
        self.taken.extend(finished)  # held until they are delivered
        return Batch(joined, freed, size, (src, dst), s.filtered, rows, finished, len(s.active),
                     self.canvas, width)

    def run(self, batch: Batch) -> Output:
        """The device: rows parked, seeded and moved, one step of the rows and one of the
        canvas's wavefront; codes copied back, finished images decoded (while they still hold
        their rows: a fault fails them with the rest), previews and strips built."""
        e, r = self.engine, self.runner
        out = Output(batch)
        if batch.freed:
            r.release(batch.freed)
        r.seed(batch.joined)
        if batch.moves[0]:
            r.move(*batch.moves)
        if batch.size:
            t0 = time.perf_counter()
            r.step(batch.size, batch.filtered)
            done = batch.rows + batch.finished
            out.codes = r.codes(done) if done else {}
            out.step_s = time.perf_counter() - t0
            if out.codes:
                out.pictures = r.pictures(batch.rows, batch.finished, out.codes, e.decode,
                                          e.patches)
        if batch.canvas is not None:
            self._run_canvas(batch.canvas, batch.canvas_width, out)
        return out

    def _run_canvas(self, im: Image, width: int, out: Output) -> None:
        e = self.engine
        if self.sampler is None:
            self.sampler = e.canvas_runner.start(im)
        s = self.sampler
        t0 = time.perf_counter()
        cells = s.plan(width)
        completed = s.step(cells)
        out.canvas_s = time.perf_counter() - t0
        out.canvas_cells = len(cells)
        W = s.grid[1]
        for row in completed:
            if im.job.on_row is not None:
                codes = s.codes[row * W:(row + 1) * W].cpu().numpy()
                out.strips.append((row, codes, e.patches.strip(codes)))
            elif row == 0:
                out.strips.append((row, None, None))  # its time to first row
        if s.done:
            out.canvas_codes = s.codes.cpu().numpy()
            out.canvas_picture = e.canvas_runner.picture(s, e.decode)

    def postprocess(self, out: Output) -> None:
        """Finished images leave their rows before anyone hears they are done; codes, images,
        previews and strips go to their jobs and the event loop."""
        e, s, batch = self.engine, self.scheduler, out.batch
        if batch.size:
            e.metrics.step_duration.labels(e.name, str(batch.size)).observe(out.step_s)
            e.metrics.batch_size.labels("generate", e.name).observe(batch.active)
        if batch.finished:
            self.runner.release(s.release(batch.finished))
            e.count_active()
        if out.codes:
            e.finish(batch.rows, batch.finished, out.codes, out.pictures)
        if batch.canvas is not None:
            e.metrics.step_duration.labels(e.name, "canvas").observe(out.canvas_s)
            e.progress(batch.canvas.job, out.canvas_cells)
            if out.canvas_codes is not None:
                self.canvas = self.sampler = None
                e.count_active()
            if out.strips or out.canvas_codes is not None:
                e.finish_canvas(batch.canvas, out.strips, out.canvas_codes, out.canvas_picture)

    def _fail(self, exc: Exception) -> None:
        """Every image the lane holds leaves, and their requests answer 500; the lane starts
        over from empty rows."""
        e = self.engine
        log.error("generation lane %s/%d failed a step", e.name, self.index, exc_info=exc)
        held = {id(im): im for im in [*self.taken, *self.scheduler.clear()]}
        if self.canvas is not None:
            held[id(self.canvas)] = self.canvas
        self.canvas = self.sampler = None
        self.runner.release(list(range(self.runner.capacity)))
        e.count_active()
        e.fail({id(im.job): im.job for im in held.values()}.values(),
               ServiceError(500, "internal_error", f"model error: {type(exc).__name__}"))


class GenerationEngine:
    """Continuous batching for one transformer: lanes of rows over one queue of images."""

    def __init__(self, name: str, runners: list[StepRunner], metrics: Metrics, *,
                 admission: Admission, decode: Callable[[torch.Tensor], torch.Tensor],
                 compile: bool = False, compile_deadline: float = float("inf"),
                 on_thread: Callable[[], None] | None = None,
                 canvas_runner: CanvasRunner | None = None, patches: Patches | None = None
                 ) -> None:
        """One lane per runner; without a `canvas_runner` the engine takes no canvases."""
        self.name = name
        self.decode = decode  # int64 grids (B, rows, cols) on the model's device -> uint8 images
        self.metrics = metrics
        self.compile = compile
        self.compile_deadline = compile_deadline  # time.monotonic(): later sizes stay eager
        self.admission = admission
        self.on_thread = on_thread
        self.patches = patches  # previews of streamed rows
        self.canvas_runner = canvas_runner
        self.lanes = [Lane(self, i, runner) for i, runner in enumerate(runners)]
        self.grid = tuple(runners[0].grid)
        self._lock = threading.Condition()
        self._waiting: deque[Image] = deque()
        self._canvases: deque[Image] = deque()  # canvases waiting for a lane
        self._stopping = False
        self._ready = 0
        self._started: asyncio.Future | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def for_model(cls, name: str, gpt: GPT, metrics: Metrics, *, slots: int, lanes: int,
                  decode: Callable[[torch.Tensor], torch.Tensor], **options: Any
                  ) -> GenerationEngine:
        """The engine of one transformer: `lanes` step runners sharing `slots` guided images
        (two rows each), its canvases and its previews."""
        per_lane = max(2, -(-2 * slots // lanes))
        return cls(name, [StepRunner(name, gpt, per_lane, metrics) for _ in range(lanes)],
                   metrics, decode=decode, canvas_runner=CanvasRunner(name, gpt, metrics),
                   patches=Patches(gpt, decode), **options)

    # ---- life cycle (event loop) -----------------------------------------------------------
    async def start(self) -> None:
        """Start the lanes; returns once every lane compiled and ran each size once."""
        self._loop = asyncio.get_running_loop()
        self._started = self._loop.create_future()
        for lane in self.lanes:
            lane.thread.start()
        await self._started

    async def close(self) -> None:
        """Finish every admitted image, then stop the lanes."""
        self.admission.drain()
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        for lane in self.lanes:
            await asyncio.to_thread(lane.thread.join)

    # ---- requests (event loop) -------------------------------------------------------------
    def submit(self, n: int, image: Callable[[int], SamplingBatch], *, guided: bool,
               grid: tuple[int, int], filtered: bool = True,
               on_row: Callable[[int, int, np.ndarray, np.ndarray], None] | None = None,
               admitted: bool = False, since: float | None = None) -> GenerateJob:
        """Queue one request of n images; `image(i)` builds image i's seeded row. A grid
        beyond the model's makes each image a canvas (relative models only). `since`: when
        the request arrived (loop.time(); default now), which its deadline counts from."""
        if tuple(grid) != self.grid and self.canvas_runner is None:
            raise ValueError(f"{self.name}: this engine samples {self.grid} grids only")
        self.admission.admit(n, admitted, closing=self._stopping)
        loop = self._loop
        self.admission.check_time(loop, since)
        job = GenerateJob(n, image, guided, grid, loop.create_future(), loop.time(), filtered,
                          on_row)
        canvas = tuple(grid) != self.grid  # each image is a lane's canvas
        job.timeout_s = self.admission.timeout_s
        job.since = job.arrival if since is None else min(since, job.arrival)
        job.cells = n * grid[0] * grid[1] if canvas else 0
        with self._lock:
            (self._canvases if canvas else self._waiting).extend(
                Image(job, i) for i in range(n))
            self.admission.enter(n)
            self.metrics.queue_depth.labels("generate", self.name).inc(n)
            self._lock.notify_all()
        self.admission.deadline(loop, job.since, self._expire, job, timeout_s=job.timeout_s)
        return job

    def cancel(self, job: GenerateJob, reason: str, error: ServiceError) -> None:
        """The job's images leave at the next step, counted as rejected for `reason`; its
        handler gets `error` (a handler that was itself cancelled has cancelled the future
        already)."""
        if self.withdraw(job, reason, error):
            self.admission.reject(reason)

    def withdraw(self, job: GenerateJob, reason: str, error: ServiceError) -> bool:
        """`cancel` without counting it; False when the job had left already."""
        if job.cancelled or job.finished is not None:
            return False
        with self._lock:
            job.cancelled = reason
            before = len(self._waiting) + len(self._canvases)
            self._waiting = deque(im for im in self._waiting if im.job is not job)
            self._canvases = deque(im for im in self._canvases if im.job is not job)
            left = before - len(self._waiting) - len(self._canvases)
            self.admission.leave(left)
            self.metrics.queue_depth.labels("generate", self.name).dec(left)
        if not job.future.done():
            job.future.set_exception(error)
        return True

    def _expire(self, job: GenerateJob) -> None:
        """A deadline check: a request that has not started, or a training-size one that has
        not finished, leaves with 504; a started canvas is given the time its work takes."""
        if job.cancelled or (job.future.done() and not job.future.cancelled()):
            return  # it left already, or finished
        if job.started is None:
            message = (f"the request did not start within {job.timeout_s:g} s of its arrival "
                       "(the server is busy; nothing of it was computed)")
        elif job.cells:
            with self._lock:
                done = job.cells_done
            now = self._loop.time()
            check = canvas_deadline(now, job.started, job.cells, done, job.cells_checked,
                                    job.timeout_s)
            if check is not None:
                if now >= job.started + job.timeout_s:  # a check, not the wait for the first
                    job.cells_checked = done
                self._loop.call_at(check, self._expire, job)
                return
            message = (f"the canvas made no progress since its last deadline check ({done} of "
                       f"{job.cells} cells sampled in {now - job.started:.3g} s)")
        else:
            message = f"the request did not finish within {job.timeout_s:g} s of its arrival"
        self.cancel(job, "deadline", self.admission.timed_out(message))

    # ---- called by the lanes, on their threads ---------------------------------------------
    def lane_ready(self, lane: Lane) -> None:
        with self._lock:
            self._ready += 1
            if self._ready == len(self.lanes):
                self._loop.call_soon_threadsafe(_resolve, self._started, None)

    def lane_failed(self, lane: Lane, exc: BaseException) -> None:
        log.error("generation lane %s/%d failed to start", self.name, lane.index, exc_info=exc)
        self._loop.call_soon_threadsafe(_resolve, self._started, exc)

    def take(self, room: int, *, want_canvas: bool, idle: bool
             ) -> tuple[list[Image], Image | None] | None:
        """Waiting images that fit in `room` free rows (in order), and the next canvas when
        the lane has none; they have left the queue. An idle lane blocks until there is work;
        None: the engine is stopping and the lane is idle."""
        with self._lock:
            while idle and not self._waiting and not self._canvases:
                if self._stopping:
                    return None
                self._lock.wait()
            joined: list[Image] = []
            while self._waiting and 1 + self._waiting[0].job.guided <= room:
                im = self._waiting.popleft()
                room -= 1 + im.job.guided
                joined.append(im)
            canvas = self._canvases.popleft() if want_canvas and self._canvases else None
            if canvas is not None:
                canvas.job.company = canvas.job.company or 1  # a canvas runs alone
            seated = [*joined, *([canvas] if canvas is not None else [])]
            if seated:
                now = self._loop.time()
                for im in seated:
                    job = im.job
                    if job.started is None:
                        job.started = now
                        self.metrics.queue_wait.labels("generate", self.name).observe(
                            now - job.arrival)
                self.admission.leave(len(seated))
                self.metrics.queue_depth.labels("generate", self.name).dec(len(seated))
            return joined, canvas

    def progress(self, job: GenerateJob, cells: int) -> None:
        """A lane sampled `cells` more cells of a canvas of `job` (its deadline reads them)."""
        with self._lock:
            job.cells_done += cells

    @property
    def waiting(self) -> bool:
        """Whether images wait for rows (a lane's canvas then takes at most half of its)."""
        return bool(self._waiting)

    def count_active(self) -> None:
        self.metrics.slots_active.labels(self.name).set(
            sum(len(lane.scheduler.active) + (lane.canvas is not None) for lane in self.lanes))

    def fail(self, jobs, error: ServiceError) -> None:
        """These jobs answer `error` (their images have left their lane)."""
        for job in jobs:
            self._loop.call_soon_threadsafe(self.withdraw, job, "internal_error", error)

    def finish(self, rows: list[Image], finished: list[Image], codes: dict[int, np.ndarray],
               pictures: dict[int, np.ndarray]) -> None:
        """Copy codes and images into their jobs (lane thread), then tell the event loop.
        A request with an image that could not be decoded fails with that error."""
        failed = {id(im.job): (im.job, p) for im in rows + finished
                  if isinstance(p := pictures.get(id(im)), ServiceError)}
        for job, error in failed.values():
            self._loop.call_soon_threadsafe(self.cancel, job, error.code, error)
        cols = self.lanes[0].runner.cols
        events = []
        for im in rows:
            if id(im.job) in failed:
                continue
            r = im.pos // cols - 1
            if im.job.on_row is None:  # the time to its first row only
                events.append((im.job, im.index, r, None, None))
            else:
                events.append((im.job, im.index, r,
                               codes[im.cond][r * cols: im.pos].copy(), pictures[id(im)]))
        done = []
        with self._lock:
            for im in finished:
                if id(im.job) not in failed and im.job.deliver(
                        im.index, codes[im.cond], pictures[id(im)]):
                    done.append(im.job)
        self._loop.call_soon_threadsafe(self._report, events, done)

    def finish_canvas(self, im: Image, strips: list, codes: np.ndarray | None,
                      picture: np.ndarray | ServiceError | None) -> None:
        """A canvas's completed rows (row, cells, strip; cells None: only its time to first
        row) and, when done, its codes and image (or the error its request fails with)."""
        job = im.job
        if isinstance(picture, ServiceError):
            self._loop.call_soon_threadsafe(self.cancel, job, picture.code, picture)
            return
        events = [(job, im.index, row, cells, strip) for row, cells, strip in strips]
        done = []
        if codes is not None:
            with self._lock:
                if job.deliver(im.index, codes, picture):
                    done.append(job)
        self._loop.call_soon_threadsafe(self._report, events, done)

    # ---- back on the event loop ------------------------------------------------------------
    def _report(self, events: list, done: list[GenerateJob]) -> None:
        now = self._loop.time()
        for job, image, row, cells, preview in events:
            if job.cancelled or job.future.done():
                continue
            if job.first_row is None:
                job.first_row = now
                self.metrics.time_to_first_row.labels(self.name).observe(now - job.arrival)
            if job.on_row is not None:
                job.on_row(image, row, cells, preview)
        for job in done:
            if not job.future.done():
                job.finished = now
                job.future.set_result(job.tokens)


def _resolve(fut: asyncio.Future, exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is None:
        fut.set_result(None)
    else:
        fut.set_exception(exc)


def lane_count(device: str, cpu_budget: int) -> int:
    """One lane per core on CPU (each a one-thread sampler); one per GPU."""
    return 1 if device.startswith("cuda") else max(1, cpu_budget)
