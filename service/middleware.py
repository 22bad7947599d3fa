"""The outermost ASGI layer: request id, body limit, request metrics and the JSON access log;
and the server's logging: one JSON line per request on stdout (logger `taming.access`, at
INFO, so TAMING_LOG_LEVEL=warning silences it), everything else as text on stderr.

Pure ASGI (no BaseHTTPMiddleware): each request pays little here. Handlers add
`model`, `batch_size`, `queue_ms` and `compute_ms` to `scope["taming.log"]` for the log line.

A body over the limit is answered 413 after the rest of it is read and dropped, up to
LINGER_BYTES and LINGER_S (a lingering close): a client that writes its whole body before
reading, as urllib, requests and httpx do, then reads the 413 instead of a reset connection.
A client that sent `Expect: 100-continue` gets the 413 without being asked for the body.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
import secrets
import sys
import time

from .engine.batches import Arrivals
from .errors import error_response
from .metrics import Metrics

log = logging.getLogger("taming.http")

ACCESS = logging.getLogger("taming.access")  # one JSON line per request, on stdout


def configure_logging(level: str = "info") -> None:
    """Idempotent: attach our handlers once per process."""
    root = logging.getLogger("taming")
    root.setLevel(level.upper())
    if getattr(root, "_taming_configured", False):
        return
    text = logging.StreamHandler(sys.stderr)
    text.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
    root.addHandler(text)
    access = logging.StreamHandler(sys.stdout)
    access.setFormatter(logging.Formatter("%(message)s"))
    ACCESS.addHandler(access)
    ACCESS.propagate = False
    root._taming_configured = True


def access(record: dict) -> None:
    if ACCESS.isEnabledFor(logging.INFO):
        ACCESS.info(json.dumps(record, separators=(",", ":")))

LOG_KEY = "taming.log"
INFERENCE = frozenset({"/generate", "/encode", "/decode", "/v1/images/generations",
                       "/v1/images/variations", "/v2/models/{name}/infer"})
ENDPOINTS = INFERENCE | {"/models", "/healthz", "/readyz", "/metrics", "/docs",
                         "/openapi.json", "/docs/oauth2-redirect", "/v1/models", "/v2",
                         "/v2/health/live", "/v2/health/ready"}
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# generated ids: a random per-process prefix and a counter (unique, and cheaper than uuid4)
_ID_PREFIX = secrets.token_hex(12)  # + 8 hex digits of counter: 32 characters, like a uuid
_ids = itertools.count()
LINGER_BYTES = 64 * 1024 * 1024  # most of a too-large body read (and dropped) before the 413
LINGER_S = 10.0  # most time spent reading it


def endpoint_of(path: str) -> str:
    """A bounded label: the route template, or "other" for unknown paths."""
    if path in ENDPOINTS:
        return path
    if path.startswith("/models/") and path.count("/") == 2:
        return "/models/{name}"
    if path.startswith("/v1/models/") and path.count("/") == 3:
        return "/v1/models/{model}"
    if path.startswith("/v2/models/"):  # the protocol's model routes: /v2/models/{name}[/x]
        tail = path.count("/")
        if tail == 3:
            return "/v2/models/{name}"
        if tail == 4 and path.rsplit("/", 1)[1] in ("infer", "ready", "config"):
            return "/v2/models/{name}/" + path.rsplit("/", 1)[1]
    if path.startswith("/docs/assets/"):
        return "/docs/assets"
    return "other"


class RequestMiddleware:
    def __init__(self, app, metrics: Metrics, max_body_bytes: int, arrivals: Arrivals) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body = max_body_bytes
        self.arrivals = arrivals

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        rid = length = None
        expects_continue = False
        for k, v in scope["headers"]:
            if k == b"x-request-id":
                rid = v.decode("latin-1")
            elif k == b"content-length":
                length = v
            elif k == b"expect":
                expects_continue = v.lower() == b"100-continue"
        if rid is None or not _REQUEST_ID.fullmatch(rid):
            rid = f"{_ID_PREFIX}{next(_ids):08x}"
        ctx = {"model": "", "t0": t0}
        scope[LOG_KEY] = ctx
        endpoint = endpoint_of(scope["path"])
        state = {"status": 499, "started": False}
        rid_header = (b"x-request-id", rid.encode())

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                state["status"], state["started"] = message["status"], True
                message["headers"] = [*message.get("headers", ()), rid_header]
            await send(message)

        inference = endpoint in INFERENCE
        if inference:
            self.metrics.in_flight.inc()
            self.arrivals.n += 1  # until the handler queues it (state.Service.run)
            ctx["arriving"] = True
        try:
            if scope["method"] in ("POST", "PUT", "PATCH"):
                if length is not None and length.isdigit() and int(length) > self.max_body:
                    # no lingering when the client waits for 100 Continue or sends too much
                    linger = not expects_continue and int(length) <= LINGER_BYTES
                    await self._too_big(scope, receive, send_with_id, linger)
                    return
                body = await self._read_body(receive)
                if body is None:  # over the limit while streaming
                    await self._too_big(scope, receive, send_with_id, True)
                    return
                if body is False:  # the client went away mid-body
                    return
                receive = _replay(body, receive)
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error on %s %s", scope["method"], scope["path"])
            if not state["started"]:
                await error_response(500, "internal_error", "internal server error")(
                    scope, receive, send_with_id)
            else:
                state["status"] = 500
        finally:
            if inference:
                self.metrics.in_flight.dec()
                if ctx.pop("arriving", False):
                    self.arrivals.n -= 1
            elapsed = time.perf_counter() - t0
            model, status = ctx["model"], state["status"]
            self.metrics.requests.labels(endpoint, model, str(status)).inc()
            self.metrics.request_duration.labels(endpoint, model).observe(elapsed)
            record = {"ts": round(time.time(), 3), "request_id": rid, "method": scope["method"],
                      "endpoint": endpoint, "path": scope["path"], "model": model,
                      "status": status, "duration_ms": round(elapsed * 1000, 2)}
            for k in ("batch_size", "queue_ms", "compute_ms", "images", "error"):
                if k in ctx:
                    record[k] = ctx[k]
            access(record)

    async def _too_big(self, scope, receive, send, linger: bool) -> None:
        """413; the connection stays open only when the whole body was read and dropped."""
        drained = linger and await _drop_body(receive)
        await error_response(413, "payload_too_large",
                             f"request body exceeds the limit of {self.max_body} bytes",
                             None if drained else {"Connection": "close"})(scope, receive, send)

    async def _read_body(self, receive) -> bytes | None | bool:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return False
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _drop_body(receive) -> bool:
    """Read and drop the rest of the body; True when it ended within the linger bounds."""

    async def drop() -> bool:
        size = 0
        while size <= LINGER_BYTES:
            message = await receive()
            if message["type"] == "http.disconnect":
                return False
            size += len(message.get("body", b""))
            if not message.get("more_body", False):
                return True
        return False

    try:
        return await asyncio.wait_for(drop(), LINGER_S)
    except asyncio.TimeoutError:
        return False


def _replay(body: bytes, receive):
    """A receive() that hands the buffered body over once, then defers to the server's."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
