"""The generation engine: continuous batching of /generate at the level of sampling steps.

Each transformer gets `lanes` threads, each with its own `SlotSampler` (a static KV cache of
rows). A lane loops: admit waiting images into free rows, run one step over the occupied
rows (padded to a fixed size), decode and hand out what finished. Images join at any step
boundary and leave the moment their last token is picked, so a request never waits for
another one's tail. Lanes pull from one shared FIFO, so whichever lane has room takes the
next image. A lane decodes its finished images (and streamed previews) itself, at its own
priority: through the tokenizer's batches they queued behind /encode on niced threads.

The event loop only submits and cancels; lanes report back with `call_soon_threadsafe`.
A ticket is the single source of truth for its request: which images are done, whether it
was cancelled (client gone, deadline), and the future its handler awaits.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from models.gpt import GPT
from models.sampling import SamplingBatch
from models.slots import SlotSampler, compiled_steps, step_variants

from .engine.admission import Admission
from .errors import RETRY_AFTER, ServiceError
from .metrics import Metrics
from .oom import split_on_oom

log = logging.getLogger("taming.generation")


@dataclass(eq=False, repr=False)
class Ticket:
    """One /generate request in the engine. Lanes touch it under the engine's lock."""

    n: int
    image: Callable[[int], SamplingBatch]  # image i's seeded one-row batch (built by a lane)
    guided: bool
    grid: tuple[int, int]
    future: asyncio.Future
    arrival: float
    filtered: bool  # uses top-k or top-p: its lane steps with the sort
    # (image, row, tokens, preview): the preview decodes the rows so far, black below
    on_row: Callable[[int, int, np.ndarray, np.ndarray], None] | None = None
    tokens: np.ndarray = field(init=False)
    images: np.ndarray | None = None  # (n, H, W, C) uint8, filled as images finish
    left: int = field(init=False)  # images not finished
    cancelled: str | None = None  # why it must leave (client_gone, deadline)
    started: float | None = None  # when its first image entered a slot (loop.time())
    first_row: float | None = None
    finished: float | None = None
    company: int = 0  # images sampling in its lane at its first step

    def __post_init__(self) -> None:
        self.tokens = np.zeros((self.n, self.grid[0] * self.grid[1]), dtype=np.int64)
        self.left = self.n


@dataclass(eq=False)
class _Image:
    ticket: Ticket
    index: int
    cond: int = -1
    uncond: int | None = None
    pos: int = 0  # cells picked so far

    @property
    def rows(self) -> list[int]:
        return [self.cond] if self.uncond is None else [self.cond, self.uncond]


class Lane:
    """One thread, one SlotSampler: steps the rows it holds until told to stop."""

    def __init__(self, engine: GenerationEngine, index: int, sampler: SlotSampler) -> None:
        self.engine = engine
        self.index = index
        self.sampler = sampler
        # compiled, by (padded size, filtered)
        self.steps: dict[tuple[int, bool], Callable[[int, bool], None]] = {}
        self.variants = step_variants(sampler.out.device.type)
        self.filtering = 0  # active images that use top-k or top-p
        self.free = list(range(sampler.capacity))  # a heap would do; sorted lists stay small
        self.active: list[_Image] = []
        self.prepared = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"taming-gen-{engine.name}-{index}",
                                       daemon=True)

    # ---- set-up on the lane's own thread ---------------------------------------------------
    def prepare(self) -> None:
        """Compile (optionally) and run every padded size once. Lanes of one GPT share its
        graphs, so only the first lane compiles; the others find them ready."""
        e = self.engine
        if e.on_thread is not None:
            e.on_thread()
        with torch.inference_mode():
            compiled = compiled_steps(self.sampler) if e.compile else None
            # three calls each: on CUDA a first call warms up and the second records the
            # graph; on CPU TorchScript's executor profiles the second and third (10-40 ms
            # each), which a lane serving its first load would otherwise pay
            calls = 3
            wanted = [(size, f) for size in self.sampler.sizes for f in self.variants]
            for size, filtered in wanted:
                if compiled is not None and time.monotonic() < e.compile_deadline:
                    for _ in range(calls):
                        compiled(size, filtered)
                    self.steps[size, filtered] = compiled
                else:
                    self.sampler(size, filtered)
            if compiled is not None and len(self.steps) < len(wanted):
                log.warning("%s lane %d: compile budget spent; %d of %d step graphs run eager",
                            e.name, self.index, len(wanted) - len(self.steps), len(wanted))
            self.sampler.release(list(range(self.sampler.capacity)))
            if self.sampler.out.device.type == "cuda":
                torch.cuda.synchronize()

    # ---- the loop --------------------------------------------------------------------------
    def _run(self) -> None:
        e = self.engine
        try:
            if self.index:  # one lane at a time: the first compiles, the others reuse
                e.lanes[self.index - 1].prepared.wait()
            self.prepare()
        except BaseException as exc:  # start-up reports it; the lane never serves
            e._lane_failed(self, exc)
            return
        finally:
            self.prepared.set()
        e._lane_ready(self)
        with torch.inference_mode():
            while True:
                joined = e._take(self)
                if joined is None:
                    break
                try:
                    self._admit(joined)
                    if self.active:
                        self._step()
                except Exception as exc:  # a bug or a device fault: its images fail, not the lane
                    held = {id(im): im for im in [*joined, *self.active]}
                    self._fail(list(held.values()), exc)

    def _admit(self, joined: list[_Image]) -> None:
        if not joined:
            return
        for im in joined:
            if not im.ticket.company:
                im.ticket.company = len(self.active) + len(joined)
        s = self.sampler
        batches = [im.ticket.image(im.index) for im in joined]
        s.admit([im.cond for im in joined], [im.uncond for im in joined],
                batches[0] if len(batches) == 1 else SamplingBatch.cat(batches),
                self.engine.null_class)
        self.active.extend(joined)
        self.filtering += sum(im.ticket.filtered for im in joined)
        self._count_active()

    def _compact(self) -> int:
        """The padded size to step at, after moving rows above the smallest size that holds
        all occupied rows into free rows below it."""
        sizes = self.sampler.sizes
        used = sum(len(im.rows) for im in self.active)
        size = next(s for s in sizes if s >= used)
        high = [(im, r) for im in self.active for r in im.rows if r >= size]
        if high:
            low = [r for r in self.free if r < size][: len(high)]
            self.sampler.move([r for _, r in high], low)
            for (im, old), new in zip(high, low, strict=True):
                if im.cond == old:
                    im.cond = new
                else:
                    im.uncond = new
            self.free = sorted(set(self.free) - set(low) | {r for _, r in high})
        return size

    def _step(self) -> None:
        e = self.engine
        size = self._compact()
        t0 = time.perf_counter()
        # without the sort when no row filters (where that variant exists): the same picks
        filtered = self.filtering > 0 or False not in self.variants
        self.steps.get((size, filtered), self.sampler)(size, filtered)
        cols = self.engine.cols
        T = self.engine.seq_len
        for im in self.active:
            im.pos += 1
        # completed token rows: every one of a streamed request, the first of any other (for
        # the time to its first row)
        rows_done = [im for im in self.active if im.pos % cols == 0 and (
            im.ticket.on_row is not None or (im.pos == cols and im.ticket.first_row is None))]
        finished = [im for im in self.active if im.pos == T]
        if rows_done or finished:
            out = self.sampler.out
            wanted = sorted({im.cond for im in rows_done + finished})
            host = out[wanted].cpu().numpy() if out.device.type != "cpu" else out[wanted].numpy()
            at = {r: host[i] for i, r in enumerate(wanted)}
        dt = time.perf_counter() - t0
        if rows_done or finished:  # while they still hold their rows: a fault fails them
            pictures = e.pictures(rows_done, finished, at)
        m = e.metrics
        m.step_duration.labels(e.name, str(size)).observe(dt)
        m.batch_size.labels("generate", e.name).observe(len(self.active))
        if finished:  # their rows are free before anyone hears they are done
            done = set(map(id, finished))
            self.active = [im for im in self.active if id(im) not in done]
            self._release(finished)
        if rows_done or finished:
            e._deliver(rows_done, finished, at, pictures)

    def _fail(self, images: list[_Image], exc: Exception) -> None:
        """Every image the lane holds leaves, and their requests answer 500; the lane starts
        over from empty rows."""
        e = self.engine
        log.error("generation lane %s/%d failed a step", e.name, self.index, exc_info=exc)
        self.active, self.filtering = [], 0
        self.sampler.release(list(range(self.sampler.capacity)))
        self.free = list(range(self.sampler.capacity))
        self._count_active()
        error = ServiceError(500, "internal_error", f"model error: {type(exc).__name__}")
        tickets = {id(im.ticket): im.ticket for im in images}
        for t in tickets.values():
            e._loop.call_soon_threadsafe(e.withdraw, t, "internal_error", error)

    def _release(self, images: list[_Image]) -> None:
        rows = [r for im in images for r in im.rows]
        self.filtering -= sum(im.ticket.filtered for im in images)
        self.sampler.release(rows)
        self.free.extend(rows)
        self.free.sort()
        self._count_active()

    def _count_active(self) -> None:
        e = self.engine
        e.metrics.slots_active.labels(e.name).set(sum(len(lane.active) for lane in e.lanes))

    def drop_cancelled(self) -> None:
        """Called under the engine lock: rows of cancelled tickets leave now."""
        gone = [im for im in self.active if im.ticket.cancelled]
        if gone:
            ids = set(map(id, gone))
            self.active = [im for im in self.active if id(im) not in ids]
            self._release(gone)


class GenerationEngine:
    """Continuous batching for one transformer: lanes of slots over shared waiting images."""

    def __init__(self, name: str, gpt: GPT, metrics: Metrics, *, slots: int, lanes: int,
                 compile: bool, admission: Admission,
                 compile_deadline: float = float("inf"),
                 decode: Callable[[torch.Tensor], torch.Tensor],
                 on_thread: Callable[[], None] | None = None) -> None:
        cfg = gpt.config
        self.name = name
        self.decode = decode  # int64 grids (B, rows, cols) on the model's device -> uint8 images
        self.device = next(gpt.parameters()).device
        self.metrics = metrics
        self.rows, self.cols = cfg.grid
        self.seq_len = cfg.seq_len
        self.null_class = cfg.null_class
        self.codebook_size = cfg.codebook_size
        self.compile = compile
        self.compile_deadline = compile_deadline  # time.monotonic(): later sizes stay eager
        self.admission = admission
        self.on_thread = on_thread
        rows = 2 * slots  # a guided image holds two rows
        per_lane = max(2, -(-rows // lanes))
        self.lanes = [Lane(self, i, SlotSampler(gpt, per_lane)) for i in range(lanes)]
        self._lock = threading.Condition()
        self._waiting: deque[_Image] = deque()
        self._stopping = False
        self._ready = 0
        self._failed: BaseException | None = None
        self._started: asyncio.Future | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

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

    def _lane_ready(self, lane: Lane) -> None:
        with self._lock:
            self._ready += 1
            if self._ready == len(self.lanes):
                self._loop.call_soon_threadsafe(_resolve, self._started, None)

    def _lane_failed(self, lane: Lane, exc: BaseException) -> None:
        log.error("generation lane %s/%d failed to start", self.name, lane.index, exc_info=exc)
        self._loop.call_soon_threadsafe(_resolve, self._started, exc)

    # ---- admission (event loop) ------------------------------------------------------------
    def submit(self, n: int, image: Callable[[int], SamplingBatch], *, guided: bool,
               grid: tuple[int, int], filtered: bool = True,
               on_row: Callable[[int, int, np.ndarray, np.ndarray], None] | None = None,
               admitted: bool = False) -> Ticket:
        """Queue one request of n images; `image(i)` builds image i's seeded row."""
        self.admission.admit(n, admitted, closing=self._stopping)
        loop = self._loop
        ticket = Ticket(n, image, guided, grid, loop.create_future(), loop.time(), filtered,
                        on_row)
        with self._lock:
            self._waiting.extend(_Image(ticket, i) for i in range(n))
            self.admission.enter(n)
            self.metrics.queue_depth.labels("generate", self.name).inc(n)
            self._lock.notify_all()
        self.admission.deadline(loop, ticket.arrival, self._expire, ticket)
        return ticket

    def cancel(self, ticket: Ticket, reason: str, error: ServiceError) -> None:
        """The ticket's images leave at the next step, counted as rejected for `reason`; its
        handler gets `error` (a handler that was itself cancelled has cancelled the future
        already)."""
        if self.withdraw(ticket, reason, error):
            self.admission.reject(reason)

    def withdraw(self, ticket: Ticket, reason: str, error: ServiceError) -> bool:
        """`cancel` without counting it; False when the ticket had left already."""
        if ticket.cancelled or ticket.finished is not None:
            return False
        with self._lock:
            ticket.cancelled = reason
            before = len(self._waiting)
            self._waiting = deque(im for im in self._waiting if im.ticket is not ticket)
            self.admission.leave(before - len(self._waiting))
            self.metrics.queue_depth.labels("generate", self.name).dec(before - len(self._waiting))
        if not ticket.future.done():
            ticket.future.set_exception(error)
        return True

    def _expire(self, ticket: Ticket) -> None:
        if not ticket.future.done() or ticket.future.cancelled():
            self.cancel(ticket, "deadline", self.admission.timed_out(
                f"the request did not finish within {self.admission.timeout_s:g} s"))

    # ---- on the lanes' threads -------------------------------------------------------------
    def _take(self, lane: Lane) -> list[_Image] | None:
        """Waiting images that fit in the lane's free rows (None: stop the lane)."""
        with self._lock:
            lane.drop_cancelled()
            while not self._waiting and not lane.active:
                if self._stopping:
                    return None
                self._lock.wait()
                lane.drop_cancelled()
            joined: list[_Image] = []
            now = None
            while self._waiting:
                im = self._waiting[0]
                guided = im.ticket.guided
                if len(lane.free) < 1 + guided:
                    break
                self._waiting.popleft()
                im.cond = lane.free.pop(0)
                im.uncond = lane.free.pop(0) if guided else None
                joined.append(im)
                t = im.ticket
                if t.started is None:
                    now = now or self._loop.time()
                    t.started = now
                    self.metrics.queue_wait.labels("generate", self.name).observe(now - t.arrival)
            if joined:
                self.admission.leave(len(joined))
                self.metrics.queue_depth.labels("generate", self.name).dec(len(joined))
            return joined

    def pictures(self, rows: list[_Image], finished: list[_Image],
                 codes: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
        """Finished images and the previews of streamed rows, by id of the image, decoded in
        one batch on the lane's thread."""
        streamed = [im for im in rows if im.ticket.on_row is not None]
        at = {id(im): k for k, im in enumerate(finished)}  # a last row's preview: the image
        grids = [codes[im.cond] for im in finished]
        for im in streamed:
            if id(im) not in at:  # the cells picked so far; code 0 below (blacked out after)
                at[id(im)] = len(grids)
                grids.append(np.where(np.arange(self.seq_len) < im.pos, codes[im.cond], 0))
        if not grids:
            return {}
        images = self._decoded(np.stack(grids))
        for im in streamed:
            pic = images[at[id(im)]]
            if not isinstance(pic, ServiceError):
                pic[im.pos // self.cols * pic.shape[0] // self.rows:] = 0
        return {key: images[k] for key, k in at.items()}

    def _deliver(self, rows: list[_Image], finished: list[_Image], codes: dict[int, np.ndarray],
                 pictures: dict[int, np.ndarray]) -> None:
        """Copy codes and images into their tickets (lane thread), then tell the event loop.
        A request with an image that could not be decoded fails with that error."""
        failed = {id(im.ticket): (im.ticket, p) for im in rows + finished
                  if isinstance(p := pictures.get(id(im)), ServiceError)}
        for t, error in failed.values():
            self._loop.call_soon_threadsafe(self.cancel, t, error.code, error)
        events = []
        for im in rows:
            if id(im.ticket) in failed:
                continue
            r = im.pos // self.cols - 1
            if im.ticket.on_row is None:  # the time to its first row only
                events.append((im.ticket, im.index, r, None, None))
            else:
                events.append((im.ticket, im.index, r,
                               codes[im.cond][r * self.cols: im.pos].copy(), pictures[id(im)]))
        done = []
        with self._lock:  # two lanes may finish images of one ticket at once
            for im in finished:
                if id(im.ticket) in failed:
                    continue
                t, image = im.ticket, pictures[id(im)]
                t.tokens[im.index] = codes[im.cond]
                if t.images is None:
                    t.images = np.zeros((t.n, *image.shape), dtype=image.dtype)
                t.images[im.index] = image
                t.left -= 1
                if t.left == 0:
                    done.append(t)
        self._loop.call_soon_threadsafe(self._report, events, done)

    def _decoded(self, grids: np.ndarray) -> list[np.ndarray | ServiceError]:
        """uint8 images of `grids`, halved on out-of-memory; an image that does not fit even
        alone gets a 503 in its place (its request fails, the others carry on)."""
        x = torch.from_numpy(grids).view(len(grids), self.rows, self.cols).to(self.device)
        m = self.metrics

        def run(lo: int, hi: int) -> np.ndarray:
            t0 = time.perf_counter()
            images = self.decode(x[lo:hi]).cpu().numpy()
            m.batch_duration.labels("decode", self.name).observe(time.perf_counter() - t0)
            m.batch_size.labels("decode", self.name).observe(hi - lo)
            return images

        def split(lo: int, hi: int) -> None:
            m.oom_splits.labels("decode", self.name).inc()
            log.warning("out of memory decoding %d images of %s: splitting", hi - lo, self.name)

        def too_big(e: BaseException) -> ServiceError:
            log.error("out of memory decoding a single image of %s", self.name)
            return ServiceError(503, "out_of_memory", "out of memory even for one image",
                                RETRY_AFTER)

        out: list[np.ndarray | ServiceError] = []
        for lo, hi, r in split_on_oom(run, 0, len(x), split, too_big):
            out.extend([r] * (hi - lo) if isinstance(r, ServiceError) else list(r))
        return out

    def _report(self, events: list, done: list[Ticket]) -> None:
        now = self._loop.time()
        for ticket, image, row, cells, preview in events:
            if ticket.cancelled or ticket.future.done():
                continue
            if ticket.first_row is None:
                ticket.first_row = now
                self.metrics.time_to_first_row.labels(self.name).observe(now - ticket.arrival)
            if ticket.on_row is not None:
                ticket.on_row(image, row, cells, preview)
        for ticket in done:
            if not ticket.future.done():
                ticket.finished = now
                ticket.future.set_result(ticket.tokens)


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

