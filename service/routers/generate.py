"""POST /generate: sample images from a model's transformer and decode them."""

from __future__ import annotations

import asyncio
import json
import secrets
from functools import partial

import numpy as np
from fastapi import APIRouter, Request
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response, StreamingResponse

from models.sampling import FREE, check_settings

from .. import edits
from ..deps import json_body, service_of
from ..engine.jobs import GeneratePayload
from ..errors import ServiceError, describe_validation, invalid
from ..imaging import header_pixels
from ..openapi import body_schema
from ..registry import ModelEntry
from ..responses import b64png, dumps, generate_json, images_response, sse_event, wants_stream
from ..schemas import GenerateRequest, GenerateResponse
from . import PNG_CONTENT, errors

router = APIRouter(tags=["inference"])  # create_app adds the API-key check

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


SSE_CONTENT = {"text/event-stream": {"schema": {"type": "string"}, "example": (
    'event: row\ndata: {"image": 0, "row": 0, "tokens": [...], "png": "..."}\n\n'
    '...\n\nevent: done\ndata: {"model": "mnist", "seed": 1234, "images": [...]}\n\n')}}


@router.post(
    "/generate", summary="Sample images (PNG, JSON with tokens, or streamed rows)",
    openapi_extra=_request_body(),
    responses={200: {"model": GenerateResponse, "content": {**PNG_CONTENT, **SSE_CONTENT},
                     "description": (
        "image/png (one image, or a tiled grid for n > 1) with X-Seed and X-Model headers; "
        "application/json when the Accept header asks for it; with Accept: "
        "text/event-stream, an event `row` per completed token row of an image (its tokens "
        "and a PNG preview), then `done` with the JSON answer (or `error`).")},
               **errors(401, 404, 413, 415, 422, 503, 504)})
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
    if svc.can_step(entry, payload.grid) and wants_stream(request):
        return await stream(request, svc, entry, payload, headers)
    tokens, images = await sample_images(request, svc, entry, payload)
    return await images_response(
        request, svc, images, headers,
        partial(generate_json, entry.name, payload.seed, tokens=tokens, grid=payload.grid))


def admit(svc, request: Request, req: GenerateRequest, cells: np.ndarray | None = None
          ) -> tuple[ModelEntry, GeneratePayload]:
    """The model, room in its queue and checked settings: every way into generation (this
    route, /v1/images and /v2 infer) passes here. `cells`: every cell of the grid, a code to
    keep or FREE (an edit)."""
    entry = svc.model(req.model, request)
    if not entry.can_generate:
        raise invalid(f"model {entry.name!r} has no trained transformer; it can only "
                      "/encode and /decode", "generator_unavailable")
    svc.check_room(entry, "generate", req.n)
    return entry, _payload(svc, entry, req, cells)


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
    entry, _ = admit(svc, request, req.model_copy(update={"grid": None}))  # settings, room
    mask = files.get("mask", req.mask)
    if isinstance(mask, str):
        mask = edits.b64_bytes(mask, "mask")
    limit = svc.settings.max_image_pixels
    if req.tokens is not None:
        tokens = edits.token_grid(req.tokens, entry)
        grid, offset = edits.place(entry, tokens.shape, req.grid, req.offset)
        _payload(svc, entry, req.model_copy(update={"grid": list(grid)}))  # canvas limits
        cells = await svc.offload(edits.token_mask, entry, tokens, mask, limit, pixels=(
            header_pixels([mask]) if isinstance(mask, bytes) else 0))
    else:
        blob = files.get("image") or edits.b64_bytes(req.image, "image")
        pixels, own = await edits.decode_image(svc, entry, blob)
        grid, offset = edits.place(entry, edits.cells_of(entry, pixels), req.grid, req.offset)
        _payload(svc, entry, req.model_copy(update={"grid": list(grid)}))  # canvas limits
        cells = await edits.image_mask(svc, entry, mask, own, pixels)
        tokens = await edits.encode_pixels(request, svc, entry, pixels)
    source = edits.Source(tokens, cells, grid, offset)
    return admit(svc, request, req.model_copy(update={"grid": list(grid)}), source.cells())


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


async def sample_images(request: Request, svc, entry: ModelEntry, payload: GeneratePayload
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Tokens (n, T) and images (n, H, W, C) of an admitted request."""
    if svc.can_step(entry, payload.grid):
        tokens, images = await _sampled(request, svc, entry, payload)
    else:  # an absolute model's wider grid: the paper's sampler in the collector's lane
        out = await svc.run(request, entry, "generate", payload.grid, payload, payload.n)
        tokens, images = out["tokens"], out["images"]
    _count(svc, entry, payload)
    return tokens, images


def _payload(svc, entry, req: GenerateRequest, cells: np.ndarray | None = None
             ) -> GeneratePayload:
    """Validate the sampling settings against the model; image 0's row is built here."""
    mr, mc = entry.grid
    grid = (mr, mc)
    if req.grid is not None:
        r, c = req.grid
        if r < mr or c < mc:
            raise invalid(f"grid [{r}, {c}] is smaller than the model's grid [{mr}, {mc}]")
        limit = entry.max_grid
        if r > limit[0] or c > limit[1]:
            raise invalid(f"grid [{r}, {c}] exceeds the maximum [{limit[0]}, {limit[1]}] of "
                          f"model {entry.name!r}")
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
    if cells is not None:
        settings["cells"] = cells
    cfg = entry.bundle.gpt.config
    if settings["cfg_scale"] != 1 and not cfg.guidance:
        raise invalid(f"guidance (cfg_scale {settings['cfg_scale']:g}) is not available on model "
                      f"{entry.name!r}: it was trained without a null class, so there is no "
                      "unconditional prediction to guide from; use cfg_scale 1",
                      "guidance_unavailable")
    if req.label is None and not cfg.unconditional:
        raise invalid(f"model {entry.name!r} is class-conditional and was never trained "
                      "without a class: name one (label, 0.."
                      f"{cfg.n_classes - 1} or a class name)")
    if grid != (mr, mc) and entry.canvases and settings["cfg_scale"] != 1:
        raise invalid(f"guidance (cfg_scale {settings['cfg_scale']:g}) is not available on "
                      f"canvases; grids beyond [{mr}, {mc}] sample with cfg_scale 1")
    try:
        if req.label is not None:
            settings["label"] = entry.class_index(req.label)
        check_settings(cfg, req.n, grid, **settings)
    except ValueError as e:
        raise invalid(str(e)) from e
    seed = secrets.randbelow(2**31) if req.seed is None else req.seed
    return GeneratePayload(settings, seed, req.n, grid, cfg)


def _count(svc, entry, payload: GeneratePayload) -> None:
    m = svc.metrics
    m.images_generated.labels(entry.name).inc(payload.n)
    cells = payload.settings.get("cells")  # an edit samples only its FREE cells
    per_image = payload.grid[0] * payload.grid[1] if cells is None else int((cells == FREE).sum())
    m.tokens_sampled.labels(entry.name).inc(payload.n * per_image)


async def _sampled(request: Request, svc, entry, payload: GeneratePayload
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Tokens (n, T) and images from the generation engine; a client that leaves frees its
    slots."""
    job = svc.sample(request, entry, payload)
    watch = asyncio.ensure_future(_disconnected(request))
    watch.add_done_callback(lambda w: w.cancelled() or svc.cancel(entry, job, "client_gone"))
    try:
        return await job.future, job.images
    finally:
        watch.cancel()
        svc.cancel(entry, job, "client_gone")  # a cancelled handler: its rows leave too
        svc.log_ticket(request, job)


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body was read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


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
            _count(svc, entry, payload)
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
            svc.log_ticket(request, job)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={**headers, "Cache-Control": "no-cache",
                                      "X-Accel-Buffering": "no"})
