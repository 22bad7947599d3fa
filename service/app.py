"""The app factory: `create_app(settings)` wires routers, errors, middleware and the lifespan.

The lifespan loads and validates every checkpoint (unless the caller already did), warms each
model up on the device thread, starts the batching engine, and on exit drains it: every
queued request is answered before the worker stops.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware

from . import __version__, docs, errors, logs, openapi
from .deps import require_api_key
from .front import InferenceRoutes
from .middleware import RequestMiddleware
from .registry import ModelEntry
from .routers import decode, encode, generate, health, inference_v2, openai_images, playground
from .routers import models as models_router
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


def create_app(settings: Settings | None = None,
               models: dict[str, ModelEntry] | None = None) -> FastAPI:
    """Build the app. `models` lets a caller pass checkpoints it already loaded."""
    settings = settings or get_settings()
    logs.configure(settings.log_level)
    svc = Service(settings, models)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await svc.start()
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
    # documents the key check of the inference routes (service/front.py makes it) and makes it
    # for /models; a server without keys pays nothing for it
    auth = [Depends(require_api_key)] if settings.api_keys else []
    for r in (generate.router, encode.router, decode.router, models_router.router,
              openai_images.router, inference_v2.router):
        app.include_router(r, dependencies=auth)
    app.include_router(health.router)
    app.include_router(inference_v2.health_router)  # probes need no key, as /readyz
    docs.install(app)  # /docs with its assets served here, not from a CDN
    openapi.document_headers(app)
    app.include_router(playground.router)
    layers: list[tuple[type, dict]] = [(RequestMiddleware, {
        "metrics": svc.metrics, "max_body_bytes": settings.max_body_bytes,
        "arrivals": svc.arrivals})]
    if settings.cors_origins:
        layers.append((CORSMiddleware, {
            "allow_origins": settings.cors_origins, "allow_methods": ["GET", "POST"],
            "allow_headers": ["Authorization", "Content-Type", "Accept", "X-Request-ID"],
            "expose_headers": ["X-Seed", "X-Model", "X-Request-ID"]}))
    # innermost of the outer layers: inside the request layer and CORS, outside FastAPI
    layers.append((InferenceRoutes, {"service": svc, "routes": {
        "/generate": generate.generate, "/encode": encode.encode, "/decode": decode.decode}}))
    app.outer_layers = layers
    return app
