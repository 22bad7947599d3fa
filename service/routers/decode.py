"""POST /decode: token grids in, images out (the decoder is convolutional: any grid size)."""

from __future__ import annotations

from functools import partial

import numpy as np
from fastapi import APIRouter, Request
from starlette.responses import Response

from ..deps import json_body, service_of
from ..errors import invalid
from ..openapi import body_schema
from ..responses import decode_json, images_response
from ..schemas import DecodeRequest, DecodeResponse
from . import PNG_CONTENT, errors

router = APIRouter(tags=["inference"])  # create_app adds the API-key check

EXAMPLES = {
    "one": {"summary": "One 7x7 grid",
            "value": {"model": "mnist", "tokens": [[i * 7 + j for j in range(7)]
                                                   for i in range(7)]}},
    "two": {"summary": "Two grids of one shape",
            "value": {"model": "mnist", "tokens": [[[5] * 7] * 7, [[9] * 7] * 7]}},
}


def check_grids(tokens: list, codebook_size: int, max_grid: tuple[int, int], max_images: int
                ) -> np.ndarray:
    """One grid or a list of grids -> int64 (N, rows, cols); 422 for anything malformed."""
    grids = tokens if tokens and tokens[0] and isinstance(tokens[0][0], list) else [tokens]
    if not grids:
        raise invalid("tokens holds no grid")
    if len(grids) > max_images:
        raise invalid(f"{len(grids)} grids; at most {max_images} per request")
    shape = None
    for i, g in enumerate(grids):
        rows = len(g)
        cols = len(g[0]) if rows else 0
        if rows == 0 or cols == 0:
            raise invalid(f"grid {i} is empty ({rows} rows, {cols} columns)")
        if rows > max_grid[0] or cols > max_grid[1]:
            raise invalid(f"grid {i} is {rows}x{cols}; the maximum is "
                          f"{max_grid[0]}x{max_grid[1]}")
        if any(len(r) != cols for r in g):
            raise invalid(f"grid {i} is ragged: every row must have {cols} ids")
        if shape is None:
            shape = (rows, cols)
        elif (rows, cols) != shape:
            raise invalid(f"grid {i} is {rows}x{cols} but grid 0 is {shape[0]}x{shape[1]}: "
                          "grids of one request must share a shape")
    try:
        arr = np.asarray(grids, dtype=np.int64)
    except OverflowError:  # ids beyond int64
        arr = None
    if arr is None or arr.min() < 0 or arr.max() >= codebook_size:
        raise invalid(f"token ids must lie in [0, {codebook_size})")
    return arr


@router.post(
    "/decode", summary="Decode token grids to images (PNG, or JSON)",
    openapi_extra=body_schema(DecodeRequest, EXAMPLES, required=True),
    responses={200: {"model": DecodeResponse, "content": PNG_CONTENT, "description": (
        "image/png (one image, or a tiled grid for several) with an X-Model header; "
        "application/json when the Accept header asks for it.")},
               **errors(401, 404, 413, 415, 422, 503, 504)})
async def decode(request: Request) -> Response:
    svc = service_of(request)
    body = await json_body(request, DecodeRequest)
    entry = svc.model(body.model, request)
    svc.check_room(entry, "decode")
    s = svc.settings
    grids = check_grids(body.tokens, entry.codebook_size, entry.max_grid, s.max_images)
    shape = tuple(grids.shape[1:])
    out = await svc.run(request, entry, "decode", shape, grids, len(grids))
    return await images_response(request, svc, out["images"], {"X-Model": entry.name},
                                 partial(decode_json, entry.name, grid=shape))
