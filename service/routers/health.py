"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import json

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from ..deps import require_metrics_key, service_of
from ..schemas import ErrorBody, Health, Ready

router = APIRouter(tags=["operations"])

_OK = b'{"status":"ok"}'


@router.get("/healthz", response_model=Health, summary="Liveness: the process answers")
async def healthz() -> Response:
    return Response(_OK, media_type="application/json")


@router.get("/readyz", response_model=Ready, summary="Readiness: models loaded and warmed up",
            responses={503: {"model": ErrorBody, "description": "Starting or draining."}})
async def readyz(request: Request) -> Response:
    svc = service_of(request)
    svc.check_ready()  # a 503 in the native shape, by the app's ServiceError handler
    return Response(json.dumps({"status": "ready", "models": list(svc.models)}).encode(),
                    media_type="application/json")


@router.get("/metrics", summary="Prometheus metrics (text format)",
            dependencies=[Depends(require_metrics_key)],
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}},
                       401: {"model": ErrorBody, "description": (
                           "Missing or invalid API key (only with TAMING_PROTECT_METRICS).")}})
async def metrics(request: Request) -> Response:
    body, content_type = service_of(request).metrics.render()
    return Response(body, media_type=content_type)
