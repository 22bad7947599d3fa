"""Model metadata: GET /models and GET /models/{name}."""

from __future__ import annotations

from fastapi import APIRouter, Path, Request
from starlette.responses import Response

from ..deps import service_of
from ..schemas import MAX_NAME, ModelInfo, ModelList
from . import errors

router = APIRouter(tags=["models"])  # create_app adds the API-key check


@router.get("/models", response_model=ModelList, responses=errors(401),
            summary="Every loaded model and the default one")
async def list_models(request: Request) -> Response:
    return Response(service_of(request).models_json, media_type="application/json")


@router.get("/models/{name}", response_model=ModelInfo, responses=errors(401, 404, 422),
            summary="One model's metadata, sampling defaults and evaluation")
async def get_model(request: Request,
                    name: str = Path(max_length=MAX_NAME, examples=["mnist"])) -> Response:
    svc = service_of(request)
    entry = svc.model(name, request)
    return Response(svc.model_json[entry.name], media_type="application/json")
