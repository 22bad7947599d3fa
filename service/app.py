"""The app factory: `create_app(settings)` wires routers, errors, middleware and the lifespan;
and the way in for the native inference routes: one table (`INFERENCE_ROUTES`) that
`InferenceRoutes` serves and FastAPI documents.

The lifespan loads and validates every checkpoint (unless the caller already did), warms each
model up on the device thread, starts the batching engine, and on exit drains it: every
queued request is answered before the worker stops.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial

from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response

from . import __version__, errors, openapi
from .deps import bearer_token, check_key, require_api_key
from .errors import ServiceError, error_response
from .middleware import RequestMiddleware, configure_logging
from .registry import ModelEntry
from .routers import decode, encode, generate, health, inference_v2, openai_images, playground
from .routers import models as models_router
from .schemas import MAX_PREFIX
from .settings import Settings, get_settings
from .state import Service

DESCRIPTION = """
Taming Transformers as a service: a VQ-VAE tokenizer and a class-conditional transformer with
sliding-window attention. Generation batches continuously: requests join and leave the
sampler at every step.

* `POST /generate` samples images (PNG by default; JSON with tokens under
  `Accept: application/json`; rows as they complete under `Accept: text/event-stream`).
* `POST /encode` turns images into token grids; `POST /decode` turns grids back into images.
* Every error is `{"error": {"code": ..., "message": ...}}`, but on the protocol routes:
  the OpenAI Images API under `/v1` answers OpenAI's error shape, the Open Inference
  Protocol (KServe v2) under `/v2` its own `{"error": "..."}`.
"""


# FastAPI's native OpenTelemetry looks its providers up on every request; /metrics serves
# Prometheus instead
NO_TELEMETRY = {"tracing": False, "metrics": False, "logs": False}


Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True)
class InferenceRoute:
    """A native inference route: the handler that serves it (through InferenceRoutes) and
    how /docs shows it (FastAPI's `add_api_route` keywords: summary, responses, ...)."""

    path: str
    handler: Handler
    docs: dict


# The one table of the native inference routes: InferenceRoutes serves them, and create_app
# registers the same entries with FastAPI for /docs and /openapi.json only.
INFERENCE_ROUTES = (
    InferenceRoute("/generate", generate.generate, generate.DOCS),
    InferenceRoute("/encode", encode.encode, encode.DOCS),
    InferenceRoute("/decode", decode.decode, decode.DOCS),
)


class InferenceRoutes:
    """The way in for POST /generate, /encode and /decode: straight to their handlers,
    outside FastAPI's middleware stack, routing and dependency solving.

    The handlers take the Request alone and parse, validate and answer by themselves, so
    this is their one request path: FastAPI keeps routes of the same handlers only to
    document them (/docs, /openapi.json), and those never see a request. On a busy CPU
    replica FastAPI's per-request machinery cost the event loop more than a one-image
    /encode itself (BENCHMARKS.md, "One request path").
    """

    def __init__(self, app, service: Service, routes: tuple[InferenceRoute, ...]) -> None:
        self.app = app
        self.svc = service
        self.routes = {r.path: r.handler for r in routes}

    async def __call__(self, scope, receive, send) -> None:
        handler = self.routes.get(scope["path"]) if scope["type"] == "http" else None
        if handler is None or scope["method"] != "POST":
            await self.app(scope, receive, send)  # FastAPI answers, 405 included
            return
        request = Request(scope, receive, send)
        try:
            check_key(self.svc, bearer_token(request))  # nothing to check without keys
            response = await handler(request)
        except ServiceError as e:
            response = error_response(e.status, e.code, e.message, e.headers)
        await response(scope, receive, send)


class TamingApp(FastAPI):
    """FastAPI, with the layers this service owns (the request layer: ids, body limit,
    metrics, access log; then CORS when configured; then the inference routes) outside
    FastAPI's own middleware stack, so that even a request FastAPI's stack fails on is
    counted and logged."""

    outer_layers: list[tuple[type, dict]] = []  # outermost first

    def build_middleware_stack(self):
        app = super().build_middleware_stack()
        for cls, kwargs in reversed(self.outer_layers):
            app = cls(app, **kwargs)
        return app


def schema_limits(svc: Service) -> openapi.Limits | None:
    """The grids' bounds for the schema, from the loaded models (None before they load)."""
    entries = list(svc.models.values())
    if not entries:
        return None
    makers = [e for e in entries if e.can_generate] or entries
    return openapi.Limits(min_side=min(min(e.bundle.gpt.config.grid) if e.can_generate
                                       else 1 for e in makers),
                          max_side=max(max(e.max_grid) for e in entries),
                          codebook=max(e.codebook_size for e in entries),
                          max_images=svc.settings.max_images, max_prefix=MAX_PREFIX,
                          classes=tuple(dict.fromkeys(
                              c for e in entries if e.can_generate for c in e.bundle.classes)))


def create_app(settings: Settings | None = None,
               models: dict[str, ModelEntry] | None = None) -> FastAPI:
    """Build the app. `models` lets a caller pass checkpoints it already loaded."""
    settings = settings or get_settings()
    configure_logging(settings.log_level)
    svc = Service(settings, models)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await svc.start()
        app.openapi_schema = None  # built again with the loaded models' bounds
        try:
            yield
        finally:
            await svc.stop()

    app = TamingApp(title="Taming Transformers server", version=__version__,
                    description=DESCRIPTION, lifespan=lifespan, docs_url=None, redoc_url=None,
                    generate_unique_id_function=openapi.operation_id,
                    telemetry=NO_TELEMETRY)
    app.state.service = svc
    errors.install(app)
    # the key check of /models; InferenceRoutes makes it for the inference routes (their
    # schema says so, see openapi.add_security); a server without keys pays nothing for it
    auth = [Depends(require_api_key)] if settings.api_keys else []
    for route in INFERENCE_ROUTES:  # documented here, served by InferenceRoutes
        app.add_api_route(route.path, route.handler, methods=["POST"], tags=["inference"],
                          **route.docs)
    # the protocol adapters check the key inside their route class (their errors' shape)
    for r in (models_router.router, openai_images.router, inference_v2.router):
        app.include_router(r, dependencies=auth)
    app.include_router(health.router)
    app.include_router(inference_v2.health_router)  # probes need no key, as /readyz
    openapi.install_docs(app)  # /docs with its assets served here, not from a CDN
    secured = tuple(r.path for r in INFERENCE_ROUTES) if settings.api_keys else ()
    openapi.document_headers(app, secured=secured, limits=partial(schema_limits, svc))
    app.include_router(playground.router)
    layers: list[tuple[type, dict]] = [(RequestMiddleware, {
        "metrics": svc.metrics, "max_body_bytes": settings.max_body_bytes,
        "arrivals": svc.arrivals, "body_timeout_s": settings.body_timeout_s})]
    if settings.cors_origins:
        layers.append((CORSMiddleware, {
            "allow_origins": settings.cors_origins, "allow_methods": ["GET", "POST"],
            "allow_headers": ["Authorization", "Content-Type", "Accept", "X-Request-ID"],
            "expose_headers": ["X-Seed", "X-Model", "X-Request-ID"]}))
    # innermost of the outer layers: inside the request layer and CORS, outside FastAPI
    layers.append((InferenceRoutes, {"service": svc, "routes": INFERENCE_ROUTES}))
    app.outer_layers = layers
    return app
