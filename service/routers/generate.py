"""POST /generate: sample images from a model's transformer and decode them."""

from __future__ import annotations

import secrets
from functools import partial
from typing import Annotated

import torch
from fastapi import APIRouter, Body, Request
from starlette.responses import Response

from models.sampling import make_batch

from ..deps import service_of
from ..errors import invalid
from ..imaging import generate_json
from ..runners import GeneratePayload
from ..schemas import GenerateRequest, GenerateResponse
from . import PNG_CONTENT, errors, images_response

router = APIRouter(tags=["inference"])  # create_app adds the API-key check

EXAMPLES = {
    "digit": {"summary": "Four sevens, seeded",
              "value": {"model": "mnist", "n": 4, "label": 7, "seed": 1234}},
    "named": {"summary": "A class by name, top-k",
              "value": {"model": "fashion-mnist", "label": "Sneaker", "top_k": 100, "seed": 7}},
    "wide": {"summary": "A wider canvas (sliding-window sampling)",
             "value": {"model": "mnist", "label": 3, "grid": [7, 14], "seed": 1}},
    "complete": {"summary": "Complete a partial grid",
                 "value": {"model": "mnist", "prefix": [0, 0, 0, 0, 0, 0, 0], "seed": 3}},
    "default": {"summary": "Everything default (random seed)", "value": {}},
}


def flat_prefix(prefix: list | None, cols: int) -> list[int] | None:
    """A flat list, or rows of `cols` ids (the last may be partial) -> raster-order ids."""
    if not prefix:
        return None
    if not isinstance(prefix[0], list):
        return prefix
    for i, row in enumerate(prefix):
        if len(row) > cols or (len(row) != cols and i != len(prefix) - 1):
            raise invalid(f"prefix row {i} has {len(row)} ids; rows must have {cols} "
                          "(only the last may be shorter)")
    return [t for row in prefix for t in row]


@router.post(
    "/generate", summary="Sample images (PNG, or JSON with tokens)",
    responses={200: {"model": GenerateResponse, "content": PNG_CONTENT, "description": (
        "image/png (one image, or a tiled grid for n > 1) with X-Seed and X-Model headers; "
        "application/json when the Accept header asks for it.")},
               **errors(401, 404, 413, 422, 503, 504)})
async def generate(request: Request,
                   body: Annotated[GenerateRequest | None, Body(openapi_examples=EXAMPLES)] = None
                   ) -> Response:
    svc = service_of(request)
    req = body or GenerateRequest()
    entry = svc.model(req.model, request)
    if not entry.can_generate:
        raise invalid(f"model {entry.name!r} has no trained transformer; it can only "
                      "/encode and /decode", "generator_unavailable")
    svc.engine.check_room(req.n)
    mr, mc = entry.grid
    grid = (mr, mc)
    if req.grid is not None:
        r, c = req.grid
        if r < mr or c < mc:
            raise invalid(f"grid [{r}, {c}] is smaller than the model's grid [{mr}, {mc}]")
        limit = svc.settings.max_grid
        if r > limit or c > limit:
            raise invalid(f"grid [{r}, {c}] exceeds the maximum [{limit}, {limit}]")
        grid = (r, c)
    d = entry.defaults
    settings = {
        "label": None,
        "temperature": d["temperature"] if req.temperature is None else req.temperature,
        "top_k": d["top_k"] if req.top_k is None else req.top_k,
        "top_p": d["top_p"] if req.top_p is None else req.top_p,
        "cfg_scale": d["cfg_scale"] if req.cfg_scale is None else req.cfg_scale,
        "prefix": flat_prefix(req.prefix, grid[1]),
    }
    try:
        if req.label is not None:
            settings["label"] = entry.class_index(req.label)
        seed = secrets.randbelow(2**31) if req.seed is None else req.seed
        first = make_batch(entry.bundle.gpt.config, 1, grid,
                           generator=torch.Generator().manual_seed(seed), **settings)
    except ValueError as e:
        raise invalid(str(e)) from e
    payload = GeneratePayload(first, settings, seed, req.n, grid)
    out = await svc.run(request, entry, "generate", grid, payload, req.n)
    m = svc.metrics
    m.images_generated.labels(entry.name).inc(req.n)
    m.tokens_sampled.labels(entry.name).inc(req.n * grid[0] * grid[1])
    return await images_response(
        request, svc, out["images"], {"X-Seed": str(seed), "X-Model": entry.name},
        partial(generate_json, entry.name, seed, tokens=out["tokens"], grid=grid))
