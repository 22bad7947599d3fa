"""Answers: content negotiation and every encoding of a response body (PNG, JSON, events).

PNG and big JSON bodies are built on the I/O pool (`Service.offload`), off the event loop;
error answers have their own module (service.errors).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from starlette.requests import Request
from starlette.responses import Response

from models.images import tile

from .png import png_bytes

if TYPE_CHECKING:
    from .state import Service


def wants_json(request: Request) -> bool:
    """True when Accept prefers application/json over image/png (PNG is the default)."""
    accept = request.headers.get("accept")
    if not accept or "json" not in accept:
        return False
    q_json = q_png = 0.0
    for part in accept.split(","):
        media, _, params = part.strip().partition(";")
        media = media.strip().lower()
        q = 1.0
        for p in params.split(";"):
            k, _, v = p.strip().partition("=")
            if k == "q":
                try:
                    q = float(v)
                except ValueError:
                    q = 0.0
        if media in ("application/json", "application/*"):
            q_json = max(q_json, q)
        elif media in ("image/png", "image/*", "*/*"):
            q_png = max(q_png, q)
    return q_json > 0 and q_json > q_png


def wants_stream(request: Request) -> bool:
    return "text/event-stream" in request.headers.get("accept", "")


def b64png(image: np.ndarray) -> str:
    return base64.b64encode(png_bytes(image)).decode("ascii")


def png_of(images: np.ndarray) -> bytes:
    """(N, H, W, C) uint8 -> one PNG: the image for N=1, a tiled grid for more."""
    return png_bytes(images[0] if len(images) == 1 else tile(images))


def dumps(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def generate_json(model: str, seed: int, images: np.ndarray, tokens: np.ndarray,
                  grid: tuple[int, int]) -> bytes:
    return dumps({"model": model, "seed": seed, "images": [
        {"png": b64png(images[i]), "tokens": tokens[i].reshape(grid).tolist(), "seed": seed + i}
        for i in range(len(images))]})


def decode_json(model: str, images: np.ndarray, grid: tuple[int, int]) -> bytes:
    return dumps({"model": model, "shape": list(grid),
                  "images": [{"png": b64png(im)} for im in images]})


def encode_json(model: str, tokens: np.ndarray) -> bytes:
    return dumps({"model": model, "shape": list(tokens.shape[1:]), "tokens": tokens.tolist()})


def sse_event(name: str, data: bytes | str) -> bytes:
    """One Server-Sent Event: its name and one line of data."""
    data = data if isinstance(data, bytes) else data.encode()
    return b"event: " + name.encode() + b"\ndata: " + data + b"\n\n"


async def images_response(request: Request, svc: Service, images: np.ndarray, headers: dict,
                          to_json: Callable[[np.ndarray], bytes]) -> Response:
    """PNG by default (one image, or a tiled grid); `to_json(images)` when Accept asks for JSON."""
    if wants_json(request):
        fn, media = to_json, "application/json"
    else:
        fn, media = png_of, "image/png"
    content = await svc.offload(fn, images, pixels=images.size)
    return Response(content, media_type=media, headers=headers)

