"""The running service: settings, loaded models, the engine, metrics and the life-cycle flags."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from fastapi import Request

from .batching import Arrivals, Engine
from .errors import ServiceError
from .metrics import Metrics
from .middleware import LOG_KEY
from .registry import ModelEntry, load_models, warm_up
from .runners import runners_for
from .settings import Settings

log = logging.getLogger("taming.service")

INLINE_PIXELS = 16 * 28 * 28


class Service:
    def __init__(self, settings: Settings, models: dict[str, ModelEntry] | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.models: dict[str, ModelEntry] = models or {}
        self._preloaded = models is not None
        self.default_model = settings.default_model
        self.runners: dict[tuple[str, str], Any] = {}
        self.engine: Engine | None = None
        self.io: ThreadPoolExecutor | None = None
        self.models_json = b""
        self.model_json: dict[str, bytes] = {}
        self.ready = False
        self.draining = False
        self.drain_started: float | None = None  # perf_counter() of the first SIGTERM
        self.arrivals = Arrivals()

    # ---- life cycle ------------------------------------------------------------------------
    async def start(self) -> None:
        s = self.settings
        sys.setswitchinterval(s.switch_interval_ms / 1000)  # process-wide, like the GIL
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
        # one torch thread each: a second multi-threaded OpenMP team slows the model worker's
        self.io = ThreadPoolExecutor(max_workers=2, thread_name_prefix="taming-io",
                                     initializer=torch.set_num_threads, initargs=(1,))
        device = next(iter(self.models.values())).device
        self.engine = Engine(self.metrics, device=device, max_batch_size=s.max_batch_size,
                             max_wait_ms=s.max_wait_ms, max_queue=s.max_queue,
                             timeout_s=s.request_timeout_s, retry_after_s=s.retry_after_s,
                             fault_oom_above=s.fault_oom_above, torch_threads=s.worker_threads(),
                             workers=s.device_workers, nice=s.model_thread_nice,
                             arrivals=self.arrivals if s.eager_batching else None)
        await self.engine.start()
        if s.warmup:
            for entry in self.models.values():
                await self.engine.call(warm_up, entry, s.max_batch_size)
        if self.draining:
            self.engine.drain()
        self.ready = True
        log.info("ready: %s on %s", ", ".join(self.models), device)

    def begin_drain(self) -> None:
        """SIGTERM: /readyz turns 503 and new inference requests get 503; the queue finishes."""
        if not self.draining:
            self.drain_started = time.perf_counter()
        self.draining = True
        if self.engine is not None:
            self.engine.drain()

    async def stop(self) -> None:
        self.begin_drain()
        self.ready = False
        if self.engine is not None:
            await self.engine.close()
        if self.io is not None:
            self.io.shutdown(wait=True)

    # ---- request helpers -------------------------------------------------------------------
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

    async def run(self, request: Request, entry: ModelEntry, operation: str, shape: Any,
                  payload: Any, size: int) -> dict[str, np.ndarray]:
        """Queue the work, wait for its batch, and note timings for the access log."""
        ctx = request.scope.get(LOG_KEY, {})
        ctx["images"] = size
        runner = self.runners[(entry.name, operation)]
        # a request that arrived before SIGTERM is served; later ones get 503 (draining)
        began = self.drain_started
        admitted = began is not None and ctx.get("t0", float("inf")) < began
        if ctx.pop("arriving", False):
            self.arrivals.n -= 1
        job = self.engine.submit(runner, shape, payload, size, is_gone=request.is_disconnected,
                                 admitted=admitted)
        try:
            return await self.engine.result(job)
        finally:
            ctx["batch_size"] = job.batch_size
            ctx["queue_ms"] = round(job.queue_s * 1000, 2)
            ctx["compute_ms"] = round(job.compute_s * 1000, 2)
