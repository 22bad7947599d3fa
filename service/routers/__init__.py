"""One router per resource; `ERRORS` documents the error answers each route can give."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from fastapi import Request
from starlette.responses import Response

from ..deps import wants_json
from ..imaging import png_of
from ..schemas import ErrorBody
from ..state import Service

_DESCRIPTIONS = {
    401: "Missing or invalid API key (only when TAMING_API_KEYS is set).",
    404: "Unknown model.",
    413: "Body or image too large.",
    415: "Unsupported media type.",
    422: "Invalid parameters.",
    503: "Overloaded or shutting down; retry after Retry-After seconds.",
    504: "The deadline passed before the work ran.",
}


def errors(*codes: int) -> dict:
    return {c: {"model": ErrorBody, "description": _DESCRIPTIONS[c]} for c in codes}


PNG_CONTENT = {"image/png": {"schema": {"type": "string", "format": "binary"}}}


async def images_response(request: Request, svc: Service, images: np.ndarray, headers: dict,
                          to_json: Callable[[np.ndarray], bytes]) -> Response:
    """PNG by default (one image, or a tiled grid); `to_json(images)` when Accept asks for JSON."""
    if wants_json(request):
        fn, media = to_json, "application/json"
    else:
        fn, media = png_of, "image/png"
    content = await svc.offload(fn, images, pixels=images.size)
    return Response(content, media_type=media, headers=headers)
