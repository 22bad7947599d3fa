"""Model metadata: GET /models and GET /models/{name}."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Path, Request
from starlette.responses import Response

from ..deps import ServiceDep, require_api_key
from ..schemas import MAX_NAME, ModelInfo, ModelList
from . import errors

router = APIRouter(tags=["models"], dependencies=[Depends(require_api_key)])


@router.get("/models", response_model=ModelList, responses=errors(401),
            summary="Every loaded model and the default one")
async def list_models(svc: ServiceDep) -> Response:
    return Response(svc.models_json, media_type="application/json")


@router.get("/models/{name}", response_model=ModelInfo, responses=errors(401, 404, 422),
            summary="One model's metadata, sampling defaults and evaluation")
async def get_model(request: Request, svc: ServiceDep,
                    name: str = Path(max_length=MAX_NAME, examples=["mnist"])) -> Response:
    entry = svc.model(name, request)
    return Response(svc.model_json[entry.name], media_type="application/json")
