"""The running service: settings, loaded models, the engine, metrics and the life-cycle flags."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import numpy as np
import torch
from fastapi import Request

from .engine.admission import Admission
from .engine.batch_runners import runners_for
from .engine.batches import Arrivals, BatchPolicy, Collector
from .engine.jobs import GenerateJob, GeneratePayload
from .engine.lanes import GenerationEngine, lane_count
from .errors import RETRY_AFTER, ServiceError
from .metrics import Metrics
from .middleware import LOG_KEY
from .registry import ModelEntry, load_models, warm_up
from .settings import Settings

log = logging.getLogger("taming.service")

INLINE_PIXELS = 16 * 28 * 28  # up to a few small images, a hop to the I/O pool costs more
# CPU only: the model threads yield the GIL's holder sooner (Python's default is 5 ms), and
# the tokenizer's run at a lower priority, so the event loop gets a core first whenever it
# has work. Generation lanes keep theirs: a niced lane lost its core whenever the loop woke,
# and every image it held waited (BENCHMARKS.md, open loop).
SWITCH_INTERVAL_S = 0.0002
MODEL_THREAD_NICE = 10
GPU_TORCH_THREADS = 4  # host-side work of a GPU worker: a few threads, not every core
COMPILE_BUDGET_S = 240.0


def init_model_thread(device: str, threads: int, nice: int = 0) -> None:
    """Each model thread: its torch threads; on CPU `nice` added to its priority, on CUDA its
    own stream (work of different threads overlaps, and a copy back waits only for its own
    kernels)."""
    torch.set_num_threads(threads)
    if device.startswith("cuda"):
        torch.cuda.set_stream(torch.cuda.Stream(torch.device(device)))
        return
    if not nice:
        return
    tid = threading.get_native_id()
    try:  # Linux: niceness is per thread
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except (AttributeError, OSError) as e:
        log.warning("model thread priority left as is: %s", e)


class Service:
    def __init__(self, settings: Settings, models: dict[str, ModelEntry] | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.models: dict[str, ModelEntry] = models or {}
        self._preloaded = models is not None
        self.default_model = settings.default_model
        self.runners: dict[tuple[str, str], Any] = {}
        self.collector: Collector | None = None
        self.generators: dict[str, GenerationEngine] = {}
        self.io: ThreadPoolExecutor | None = None
        self.models_json = b""
        self.model_json: dict[str, bytes] = {}
        self.ready = False
        self.draining = False
        self.drain_started: float | None = None  # perf_counter() of the first SIGTERM
        self.arrivals = Arrivals()
        # one gate for every queue: TAMING_MAX_QUEUE bounds the images queued in all of them
        self.admission = Admission(self.metrics, max_queue=settings.max_queue,
                                   timeout_s=settings.request_timeout_s)

    # ---- life cycle ------------------------------------------------------------------------
    async def start(self) -> None:
        s = self.settings
        if not self._preloaded:
            self.models = await asyncio.to_thread(load_models, s)
        if self.default_model not in self.models:
            self.default_model = next(iter(self.models))
        for name, entry in self.models.items():
            ops = runners_for(entry)
            self.runners.update({(name, op): r for op, r in ops.items()})
            self.metrics.add_model(name, entry.bundle.digest, entry.device, tuple(ops))
            self.model_json[name] = json.dumps(entry.info).encode()
        self.models_json = json.dumps({"models": [e.info for e in self.models.values()],
                                       "default": self.default_model}).encode()
        device = next(iter(self.models.values())).device
        cuda = device.startswith("cuda")
        budget = s.cpu_budget()
        if not cuda:
            sys.setswitchinterval(SWITCH_INTERVAL_S)  # process-wide, like the GIL
        # one torch thread each: a second multi-threaded OpenMP team slows the model threads
        self.io = ThreadPoolExecutor(max_workers=2, thread_name_prefix="taming-io",
                                     initializer=torch.set_num_threads, initargs=(1,))
        # CPU: one single-threaded model thread per core (OpenMP teams beside a busy event
        # loop stall at their barriers); GPU: one thread per stream
        threads = min(GPU_TORCH_THREADS, budget) if cuda else 1
        on_thread = partial(init_model_thread, device, threads, MODEL_THREAD_NICE)
        self.collector = Collector(
            self.metrics, BatchPolicy(s.max_batch_size, s.max_wait_ms / 1000.0), device=device,
            admission=self.admission, workers=1 if cuda else budget, on_thread=on_thread,
            arrivals=self.arrivals)
        await self.collector.start()
        deadline = time.monotonic() + COMPILE_BUDGET_S
        for name, entry in self.models.items():
            await self.collector.call(warm_up, entry)
            if not entry.can_generate:
                continue
            gen = GenerationEngine.for_model(
                name, entry.bundle.gpt, self.metrics, slots=entry.slots or s.generate_slots,
                lanes=lane_count(device, budget), compile=s.compile, compile_deadline=deadline,
                admission=self.admission, decode=entry.tokenizer.decode_pixels,
                on_thread=partial(init_model_thread, device, threads))
            self.generators[name] = gen
            await gen.start()
        if self.draining:
            self.begin_drain()
        # what start-up built lives as long as the process: out of the collector's sight, a
        # full collection under load scans what requests made, not the models and libraries
        # (scanning those held the GIL, so every lane and the event loop, that long)
        gc.collect()
        gc.freeze()
        self.ready = True
        log.info("ready: %s on %s", ", ".join(self.models), device)

    def begin_drain(self) -> None:
        """SIGTERM: /readyz turns 503 and new inference requests get 503; the queue finishes."""
        if not self.draining:
            self.drain_started = time.perf_counter()
        self.draining = True
        self.admission.drain()
        if self.collector is not None:
            self.collector.drain()  # a filling batch closes at once

    async def stop(self) -> None:
        self.begin_drain()
        self.ready = False
        gc.unfreeze()  # what this service held can be collected again (tests build many)
        for gen in self.generators.values():
            await gen.close()
        if self.collector is not None:
            await self.collector.close()
        if self.io is not None:
            self.io.shutdown(wait=True)

    # ---- request helpers -------------------------------------------------------------------
    def check_ready(self) -> None:
        """503 while the models load or the server drains (/readyz and the protocols' own)."""
        if self.draining:
            raise ServiceError(503, "draining", "the server is shutting down", RETRY_AFTER)
        if not self.ready:
            raise ServiceError(503, "not_ready", "models are still loading", RETRY_AFTER)

    def model(self, name: str | None, request: Request | None = None) -> ModelEntry:
        """Look a name up in the loaded registry (never on disk); 404 when unknown."""
        entry = self.models.get(self.default_model if name is None else name)
        if entry is None:
            raise ServiceError(404, "model_not_found", f"no model named {name!r}; loaded: "
                               f"{', '.join(self.models)}")
        if request is not None:
            request.scope.get(LOG_KEY, {})["model"] = entry.name
        return entry

    async def offload(self, fn, *args, pixels: int | None = None) -> Any:
        """Image decoding, PNG encoding and big JSON run on the I/O pool, off the event loop.

        Work on at most INLINE_PIXELS pixels (a few 28x28 images: tens of microseconds) runs
        inline: the hop to a thread and back would cost more than the work itself.
        """
        if pixels is not None and pixels <= INLINE_PIXELS:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self.io, fn, *args)

    def check_room(self, entry: ModelEntry, operation: str, n: int = 1) -> None:
        """503 now, before a body is parsed, when the queues are full (one bound for every
        model and operation: `entry` and `operation` name the work for callers' sake)."""
        self.admission.check_room(n)

    def _admitted(self, ctx: dict) -> bool:
        """A request that arrived before SIGTERM is served; later ones get 503 (draining)."""
        began = self.drain_started
        return began is not None and ctx.get("t0", float("inf")) < began

    async def run(self, request: Request, entry: ModelEntry, operation: str, shape: Any,
                  payload: Any, size: int) -> dict[str, np.ndarray]:
        """Queue work for the collector, wait for its batch, note timings for the access log."""
        ctx = request.scope.get(LOG_KEY, {})
        ctx["images"] = size
        runner = self.runners[(entry.name, operation)]
        self.arrivals.settle(ctx)
        job = self.collector.submit(runner, shape, payload, size, is_gone=request.is_disconnected,
                                    admitted=self._admitted(ctx), since=ctx.get("arrival"))
        try:
            return await self.collector.result(job)
        finally:
            ctx["batch_size"] = job.batch_size
            ctx["queue_ms"] = round(job.queue_s * 1000, 2)
            ctx["compute_ms"] = round(job.compute_s * 1000, 2)

    def can_step(self, entry: ModelEntry, grid: tuple[int, int]) -> bool:
        """Whether the generation engine samples this grid (the model's own, or any canvas of
        a relative model), or the collector's re-forwarding sampler."""
        return entry.name in self.generators and (
            tuple(grid) == tuple(entry.grid) or entry.canvases)

    def sample(self, request: Request, entry: ModelEntry, payload: GeneratePayload,
               on_row=None) -> GenerateJob:
        """Hand a request's images to its model's generation engine."""
        ctx = request.scope.get(LOG_KEY, {})
        ctx["images"] = payload.n
        self.arrivals.settle(ctx)
        return self.generators[entry.name].submit(
            payload.n, payload.image, guided=payload.guided, grid=payload.grid,
            filtered=payload.filtered, on_row=on_row,
            admitted=self._admitted(ctx), since=ctx.get("arrival"))

    @staticmethod
    def log_job(request: Request, job: GenerateJob) -> None:
        """The access log's batch_size (images beside it at its first step), queue_ms (until
        its first step) and compute_ms (sampling) for a /generate request."""
        ctx = request.scope.get(LOG_KEY, {})
        if job.started is not None:
            ctx["batch_size"] = job.company
            ctx["queue_ms"] = round((job.started - job.arrival) * 1000, 2)
            if job.finished is not None:
                ctx["compute_ms"] = round((job.finished - job.started) * 1000, 2)

    def cancel(self, entry: ModelEntry, job: GenerateJob, reason: str) -> None:
        """Free a job's slots at the next step (its client left, or its answer failed)."""
        self.generators[entry.name].cancel(job, reason, ServiceError(
            499, reason, "the client closed the connection"))
