"""POST /generate: sample images from a model's transformer and decode them."""

from __future__ import annotations

import asyncio
import json
from functools import partial

from fastapi import Request
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response, StreamingResponse

from .. import edits
from ..deps import json_body, service_of
from ..engine.jobs import GeneratePayload
from ..errors import ServiceError, describe_validation, invalid
from ..imaging import header_pixels
from ..inference import admit, count_sampled, generator, keep_cells, sample_images, settings_of
from ..openapi import body_schema
from ..registry import ModelEntry
from ..responses import b64png, dumps, generate_json, images_response, sse_event, wants_stream
from ..schemas import GenerateRequest, GenerateResponse
from . import PNG_CONTENT, errors

EXAMPLES = {
    "digit": {"summary": "Four sevens, seeded",
              "value": {"model": "mnist", "n": 4, "label": 7, "seed": 1234}},
    "named": {"summary": "A class by name, top-k",
              "value": {"model": "fashion-mnist", "label": "Sneaker", "top_k": 100, "seed": 7}},
    "wide": {"summary": "A wider canvas (sliding-window sampling)",
             "value": {"model": "mnist", "label": 3, "grid": [7, 14], "seed": 1}},
    "scene": {"summary": "A 512x512 landscape canvas (cached sliding window)",
              "value": {"model": "landscapes", "grid": [64, 64], "seed": 5}},
    "complete": {"summary": "Complete a partial grid",
                 "value": {"model": "mnist", "prefix": [0, 0, 0, 0, 0, 0, 0], "seed": 3}},
    "inpaint": {"summary": "Repaint the middle rows of a token grid (mask: true = sample)",
                "value": {"model": "mnist", "label": 3, "seed": 4,
                          "tokens": [[249, 34, 184, 129, 129, 147, 56]] * 7,
                          "mask": [[False] * 7] * 3 + [[True] * 7] * 2 + [[False] * 7] * 2}},
    "outpaint": {"summary": "Extend a grid into a wider canvas, the source at [row, col]",
                 "value": {"model": "mnist", "label": 3, "seed": 4, "grid": [7, 12],
                           "offset": [0, 2], "tokens": [[249, 34, 184, 129, 129, 147, 56]] * 7}},
    "default": {"summary": "Everything default (random seed)", "value": {}},
}
# the multipart form of an edit: the image and its mask as files, other fields as text
FORM_SCHEMA = {"multipart/form-data": {"schema": {"type": "object", "properties": {
    "image": {"type": "string", "format": "binary", "description": "PNG, JPEG or WebP."},
    "mask": {"type": "string", "format": "binary", "description": (
        "PNG at the image's size: transparent (or, without alpha, black) pixels are sampled; "
        "or a JSON cell grid as text.")},
    "tokens": {"type": "string", "description": "A JSON token grid, instead of `image`."},
    "model": {"type": "string"}, "n": {"type": "integer"}, "label": {"type": "string"},
    "seed": {"type": "integer"}, "grid": {"type": "string", "description": "JSON [rows, cols]."},
    "offset": {"type": "string", "description": "JSON [row, col]."},
    "temperature": {"type": "number"}, "top_k": {"type": "integer"},
    "top_p": {"type": "number"}, "cfg_scale": {"type": "number"}}}}}


def _request_body() -> dict:
    """The JSON body (schema and examples) and the multipart form of an edit."""
    extra = body_schema(GenerateRequest, EXAMPLES, required=False)
    extra["requestBody"]["content"].update(FORM_SCHEMA)
    return extra


SSE_CONTENT = {"text/event-stream": {"schema": {"type": "string"}, "example": (
    'event: row\ndata: {"image": 0, "row": 0, "tokens": [...], "png": "..."}\n\n'
    '...\n\nevent: done\ndata: {"model": "mnist", "seed": 1234, "images": [...]}\n\n')}}


# how /docs shows the route (service.app.INFERENCE_ROUTES serves it)
DOCS = {
    "summary": "Sample images (PNG, JSON with tokens, or streamed rows)",
    "openapi_extra": _request_body(),
    "responses": {200: {"model": GenerateResponse, "content": {**PNG_CONTENT, **SSE_CONTENT},
                        "description": (
        "image/png (one image, or a tiled grid for n > 1) with X-Seed and X-Model headers; "
        "application/json when the Accept header asks for it; with Accept: "
        "text/event-stream, an event `row` per completed token row of an image (its tokens "
        "and a PNG preview), then `done` with the JSON answer (or `error`).")},
        **errors(401, 404, 413, 415, 422, 503, 504)}}


async def generate(request: Request) -> Response:
    svc = service_of(request)
    if _media(request) == "multipart/form-data":
        req, files = await form_body(request)
    else:
        req = await json_body(request, GenerateRequest, optional=True) or GenerateRequest()
        files = {}
    if is_edit(req, files):
        entry, payload = await admit_edit(svc, request, req, files)
    else:
        entry, payload = admit(svc, request, req)
    headers = {"X-Seed": str(payload.seed), "X-Model": entry.name}
    if payload.stepped and wants_stream(request):
        return await stream(request, svc, entry, payload, headers)
    tokens, images = await sample_images(request, svc, entry, payload)
    return await images_response(
        request, svc, images, headers,
        partial(generate_json, entry.name, payload.seed, tokens=tokens, grid=payload.grid))


# ---- edits: a source image or grid, a mask, a larger canvas -----------------------------------
FORM_FILES = ("image", "mask")


def _media(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def is_edit(req: GenerateRequest, files: dict[str, bytes]) -> bool:
    """Whether the request edits a source; 422 for edit fields without one."""
    if req.image is not None or req.tokens is not None or "image" in files:
        return True
    given = [f for f in ("mask", "offset") if getattr(req, f) is not None or f in files]
    if given:
        raise invalid(f"{', '.join(given)} needs a source to edit: give `image` or `tokens`")
    return False


async def admit_edit(svc, request: Request, req: GenerateRequest, files: dict[str, bytes]
                     ) -> tuple[ModelEntry, GeneratePayload]:
    """`admit` for an edit: every check (settings, mask, canvas, offset) before the source
    is encoded, then the cells it keeps."""
    sources = [f for f in ("image", "tokens") if getattr(req, f) is not None or f in files]
    if len(sources) > 1:
        raise invalid("give one source: `image` or `tokens`, not both")
    if req.prefix is not None:
        raise invalid("prefix and an edited source exclude each other (the source's kept "
                      "cells are the prefix)")
    entry = generator(svc, request, req.model, req.n)
    mask = files.get("mask", req.mask)
    if isinstance(mask, str):
        mask = edits.b64_bytes(mask, "mask")
    limit = svc.settings.max_image_pixels
    if req.tokens is not None:
        tokens = edits.token_grid(req.tokens, entry)
        grid, offset = edits.place(entry, tokens.shape, req.grid, req.offset)
        payload = settings_of(svc, entry, req.model_copy(update={"grid": list(grid)}))
        cells = await svc.offload(edits.token_mask, entry, tokens, mask, limit, pixels=(
            header_pixels([mask]) if isinstance(mask, bytes) else 0))
    else:
        blob = files.get("image") or edits.b64_bytes(req.image, "image")
        pixels, own = await edits.decode_image(svc, entry, blob)
        grid, offset = edits.place(entry, edits.cells_of(entry, pixels), req.grid, req.offset)
        payload = settings_of(svc, entry, req.model_copy(update={"grid": list(grid)}))
        cells = await edits.image_mask(svc, entry, mask, own, pixels)
        tokens = await edits.encode_pixels(request, svc, entry, pixels)
    keep_cells(payload, edits.Source(tokens, cells, grid, offset).cells())
    return entry, payload


async def form_body(request: Request) -> tuple[GenerateRequest, dict[str, bytes]]:
    """A multipart /generate: files `image` and `mask`, every other field as text (JSON
    values, such as `7` or `[7, 14]`, read as JSON; other text as a string)."""
    try:
        form = await request.form(max_files=len(FORM_FILES),
                                  max_fields=len(GenerateRequest.model_fields))
    except StarletteHTTPException as e:
        raise invalid(f"bad multipart body: {e.detail}") from e
    fields: dict = {}
    files: dict[str, bytes] = {}
    try:
        for key, value in form.multi_items():
            if key in fields or key in files:
                raise invalid(f"{key} is given twice")
            if isinstance(value, UploadFile):
                if key not in FORM_FILES:
                    raise invalid(f"{key}: only {' and '.join(FORM_FILES)} may be files")
                files[key] = await value.read()
                if not files[key]:
                    raise invalid(f"{key}: the file is empty")
            else:
                fields[key] = _form_value(key, value)
    finally:
        await form.close()
    for key in files:
        if key in fields:
            raise invalid(f"{key} is given twice")
    try:
        return GenerateRequest.model_validate(fields), files
    except ValidationError as e:
        raise invalid(describe_validation([{**err, "loc": ("body", *err["loc"])}
                                           for err in e.errors()])) from None


def _form_value(key: str, text: str):
    """A text field of a form: JSON when it parses as JSON (numbers, lists), else itself;
    names stay strings."""
    if key in ("model", "image"):
        return text
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return text


# ---- Server-Sent Events ------------------------------------------------------------------
async def stream(request: Request, svc, entry, payload: GeneratePayload,
                 headers: dict) -> Response:
    """Rows as they complete, then the JSON answer. Errors before the first row are plain
    error answers (the status line is not sent until then); later ones an `error` event."""
    rows: asyncio.Queue = asyncio.Queue()
    job = svc.sample(request, entry, payload, on_row=lambda *row: rows.put_nowait(row))
    done = asyncio.ensure_future(job.future)
    first = asyncio.ensure_future(rows.get())
    try:
        await asyncio.wait({done, first}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        svc.cancel(entry, job, "client_gone")
        first.cancel()
        raise
    if done.done() and done.exception() is not None and rows.empty():
        first.cancel()
        raise done.exception()
    grid = payload.grid
    canvas = tuple(grid) != tuple(entry.grid)

    async def events():
        finished = False
        try:
            pending_first = first
            while True:
                if pending_first is not None:
                    row = await pending_first
                    pending_first = None
                elif done.done() and rows.empty():
                    break
                else:
                    getter = asyncio.ensure_future(rows.get())
                    await asyncio.wait({getter, done}, return_when=asyncio.FIRST_COMPLETED)
                    if not getter.done():
                        getter.cancel()
                        continue
                    row = getter.result()
                image, r, cells, preview = row
                event = {"image": image, "row": r, "tokens": cells.tolist(),
                         "png": b64png(preview)}
                if canvas:  # the strip of this row alone, painted at pixel row `top`
                    event["top"] = r * preview.shape[0]
                yield sse_event("row", dumps(event))
            tokens, images = done.result(), job.images
            count_sampled(svc, entry, payload)
            body = await svc.offload(partial(generate_json, entry.name, payload.seed,
                                             tokens=tokens, grid=grid), images,
                                     pixels=images.size)
            finished = True
            yield sse_event("done", body)
        except ServiceError as e:
            finished = True
            yield sse_event("error", dumps({"error": {"code": e.code, "message": e.message}}))
        finally:
            if not finished:
                svc.cancel(entry, job, "client_gone")
            done.cancel()
            svc.log_job(request, job)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={**headers, "Cache-Control": "no-cache",
                                      "X-Accel-Buffering": "no"})
