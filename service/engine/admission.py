"""Admission: the one gate in front of every queue (generation and batches, every model).

It counts the images queued in all of them together, so TAMING_MAX_QUEUE bounds that total;
it refuses work while the server drains; it arms each job's deadline (504); and it counts
every refusal in `taming_rejected` by reason. The queues themselves stay with their owners:
`enter` and `leave` tell the gate what they hold.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

from ..errors import RETRY_AFTER, ServiceError
from ..metrics import Metrics


class Admission:
    """Shared by the generation engines and the batcher of one service. `enter` is called on
    the event loop, `leave` also on lane threads: the count has a lock of its own."""

    def __init__(self, metrics: Metrics, *, max_queue: int = 512,
                 timeout_s: float = 30.0) -> None:
        self.metrics = metrics
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self.queued = 0  # images waiting in every queue, not yet in a slot or a batch
        self.accepting = True
        self._lock = threading.Lock()

    # ---- the gate (event loop) -------------------------------------------------------------
    def check_room(self, n: int = 1) -> None:
        """503 when the queues cannot take `n` more images now; 422 when they never can (`n`
        alone is past TAMING_MAX_QUEUE): the bound holds for every job, an empty queue's
        first included. Handlers ask before parsing a body too: under a retry storm a
        refusal stays cheap."""
        if n > self.max_queue:  # the client's to fix: not counted as a refusal for load
            raise ServiceError(422, "too_many_images", (
                f"{n} images in one request can never be queued: this server queues at most "
                f"{self.max_queue} (TAMING_MAX_QUEUE); send at most {self.max_queue}"))
        queued = self.queued
        if queued + n > self.max_queue:
            self.reject("queue_full")
            raise ServiceError(503, "overloaded", (
                f"the queue is full ({queued} of {self.max_queue} images waiting; this request "
                f"needs room for {n})"), RETRY_AFTER)

    def check_time(self, loop: asyncio.AbstractEventLoop, since: float | None) -> None:
        """504 before anything is queued when the request's deadline passed already (its
        body took the time): its timer would fire only after a worker might take it."""
        if since is not None and loop.time() >= since + self.timeout_s:
            self.reject("deadline")
            raise self.timed_out(f"the request did not start within {self.timeout_s:g} s "
                                 "of its arrival (its body took that long)")

    def admit(self, n: int, admitted: bool = False, closing: bool = False) -> None:
        """Let `n` images in, or raise 503: draining (or `closing`, its owner stopping), or
        no room. `admitted`: part of a request the server accepted already (it arrived
        before draining began, or it is the decode of a sampled one): let in whatever the
        queue holds. The caller then queues the images and calls `enter(n)`."""
        if closing or not (self.accepting or admitted):
            self.reject("draining")
            raise ServiceError(503, "draining", "the server is shutting down", RETRY_AFTER)
        if not admitted:
            self.check_room(n)

    def drain(self) -> None:
        """SIGTERM: new work is refused; what is queued still runs."""
        self.accepting = False

    # ---- the count -------------------------------------------------------------------------
    def enter(self, n: int) -> None:
        with self._lock:
            self.queued += n

    def leave(self, n: int) -> None:
        with self._lock:
            self.queued -= n

    # ---- deadlines and refusals ------------------------------------------------------------
    def deadline(self, loop: asyncio.AbstractEventLoop, arrival: float,
                 expire: Callable[..., None], *args,
                 timeout_s: float | None = None) -> asyncio.TimerHandle:
        """Call `expire(*args)` when the deadline of work that arrived at `arrival`
        (loop.time()) passes (`timeout_s` later, default the request timeout); the caller
        answers with `timed_out(...)`."""
        return loop.call_at(arrival + (timeout_s or self.timeout_s), expire, *args)

    @staticmethod
    def timed_out(message: str) -> ServiceError:
        """The 504 of a job whose deadline passed."""
        return ServiceError(504, "deadline_exceeded", message)

    def reject(self, reason: str) -> None:
        self.metrics.rejected.labels(reason).inc()
