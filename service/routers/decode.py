"""POST /decode: token grids in, images out (the decoder is convolutional: any grid size)."""

from __future__ import annotations

from functools import partial

from fastapi import Request
from starlette.responses import Response

from ..deps import json_body, service_of
from ..inference import check_grids
from ..openapi import body_schema
from ..responses import decode_json, images_response
from ..schemas import DecodeRequest, DecodeResponse
from . import PNG_CONTENT, errors

EXAMPLES = {
    "one": {"summary": "One 7x7 grid",
            "value": {"model": "mnist", "tokens": [[i * 7 + j for j in range(7)]
                                                   for i in range(7)]}},
    "two": {"summary": "Two grids of one shape",
            "value": {"model": "mnist", "tokens": [[[5] * 7] * 7, [[9] * 7] * 7]}},
}


# how /docs shows the route (service.app.INFERENCE_ROUTES serves it)
DOCS = {"summary": "Decode token grids to images (PNG, or JSON)",
        "openapi_extra": body_schema(DecodeRequest, EXAMPLES, required=True),
        "responses": {200: {"model": DecodeResponse, "content": PNG_CONTENT, "description": (
            "image/png (one image, or a tiled grid for several) with an X-Model header; "
            "application/json when the Accept header asks for it.")},
            **errors(401, 404, 413, 415, 422, 503, 504)}}


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
