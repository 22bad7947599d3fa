"""The OpenAI Images API under /v1, for the `openai` client and the tools built on it.

Thin adapters over service/inference.py: a generation is a `GenerateRequest` checked by the
same `settings_of` and sampled by the same `sample_images` as POST /generate, a variation the
same `encode_uploads` as POST /encode and then a generation whose prefix is the first share
of the image's tokens. So the same admission, batching, limits, deadlines, metrics and access
log apply, and the same seed and class give the same pixels as /generate. Errors here have OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`; 422s of the native API are 400s here, the
status OpenAI's clients raise `BadRequestError` for.
"""

from __future__ import annotations

import json
import re
import time
from typing import Literal

import numpy as np
from fastapi import APIRouter, Path, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from .. import edits
from ..deps import NOT_JSON, service_of
from ..engine.jobs import GeneratePayload
from ..errors import CODES, ServiceError, openai_error
from ..imaging import header_pixels
from ..inference import (
    encode_uploads,
    generator,
    keep_cells,
    keep_prefix,
    sample_images,
    settings_of,
)
from ..registry import ModelEntry
from ..responses import b64png, dumps
from ..schemas import MAX_NAME, GenerateRequest
from .protocol_route import ProtocolError, error_responses, protocol_route

STARTED = int(time.time())  # `created` of every model: when this server process started
MAX_PROMPT = 1000
DEFAULT_KEEP = 0.5
SIZE = re.compile(r"([1-9][0-9]{0,5})x([1-9][0-9]{0,5})")  # "WxH", as OpenAI writes it
SAMPLING = ("model", "n", "seed", "temperature", "top_k", "top_p", "cfg_scale")
GENERATION_FIELDS = frozenset({*SAMPLING, "prompt", "size", "response_format"})
VARIATION_FIELDS = GENERATION_FIELDS | {"image", "keep"}


router = APIRouter(prefix="/v1", tags=["openai"], route_class=protocol_route(openai_error))


# ---- the contract, as /docs shows it ---------------------------------------------------
class OpenAIErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error or server_error.")
    param: str | None = Field(description="The request field at fault, when one is.")
    code: str | None = Field(description="The native API's error code (docs/api.md).")


class OpenAIError(BaseModel):
    error: OpenAIErrorDetail


# the sampling fields as POST /generate bounds them: the schema says what the server takes
_SAMPLING_FIELDS = {name: GenerateRequest.model_fields[name] for name in (
    "seed", "temperature", "top_k", "top_p", "cfg_scale")}
SIZE_PATTERN = r"^(auto|[1-9][0-9]{0,5}x[1-9][0-9]{0,5})$"


class ImageGenerationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # an unknown field is refused, by name

    prompt: str = Field(max_length=MAX_PROMPT, description=(
        "A class of the model, by name or index (\"7\", \"Sneaker\"); empty for unconditional."))
    model: str | None = Field(None, max_length=MAX_NAME, description="Default: the server's.")
    n: int = Field(1, ge=1, le=64)
    size: str | None = Field(None, pattern=SIZE_PATTERN, description=(
        "\"WxH\" in pixels: the model's size (default, or \"auto\"), or a larger canvas of "
        "whole tokens up to max_grid (sliding-window sampling)."), examples=["28x28"])
    response_format: Literal["b64_json"] | None = Field("b64_json", description=(
        "b64_json; url is refused (nothing is stored)."))
    seed: int | None = _SAMPLING_FIELDS["seed"]
    temperature: float | None = _SAMPLING_FIELDS["temperature"]
    top_k: int | None = _SAMPLING_FIELDS["top_k"]
    top_p: float | None = _SAMPLING_FIELDS["top_p"]
    cfg_scale: float | None = _SAMPLING_FIELDS["cfg_scale"]


class ImageData(BaseModel):
    b64_json: str = Field(description="Base64-encoded PNG.")
    seed: int = Field(description="Seed that reproduces this image alone (n=1).")


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: str = "png"
    size: str


class OpenAIModel(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str
    classes: list[str]
    size: str = Field(description="The model's image size, WxH.")


class OpenAIModelList(BaseModel):
    object: str = "list"
    data: list[OpenAIModel]


def _form_field(name: str) -> dict:
    """A sampling field's schema, bounds included, for the multipart form."""
    schema = ImageGenerationRequest.model_json_schema()["properties"][name]
    options = [o for o in schema.get("anyOf", [schema]) if o.get("type") != "null"]
    return {**options[0], **({"description": schema["description"]}
                             if "description" in schema else {})}


_VARIATION_FORM = {"requestBody": {"required": True, "content": {"multipart/form-data": {
    "schema": {"type": "object", "required": ["image"], "additionalProperties": False,
               "properties": {
        "image": {"type": "string", "format": "binary", "description": "PNG, JPEG or WebP."},
        "model": {"type": "string"}, "n": {"type": "integer", "minimum": 1, "maximum": 64},
        "size": {"type": "string", "pattern": SIZE_PATTERN},
        "response_format": {"type": "string", "enum": ["b64_json"]},
        "keep": {"type": "number", "minimum": 0, "exclusiveMaximum": 1, "description": (
            f"Share of the image's tokens kept, in raster order (default {DEFAULT_KEEP}).")},
        "prompt": {"type": "string", "description": "A class, as for generations."},
        **{name: _form_field(name) for name in _SAMPLING_FIELDS}}}}}}}

ERRORS = error_responses(OpenAIError, 400, 401, 404, 413, 415, 503, 504)


# ---- routes ------------------------------------------------------------------------------
@router.post("/images/generations", summary="OpenAI: create images",
             openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                 "schema": ImageGenerationRequest.model_json_schema()}}}},
             response_model=ImagesResponse, responses=ERRORS)
async def create_image(request: Request) -> Response:
    svc = service_of(request)
    fields = await _json_fields(request)
    req, entry, size = _generate_request(svc, request, fields)
    return await _images(request, svc, entry, settings_of(svc, entry, req), size)


@router.post("/images/variations", summary="OpenAI: variations of an uploaded image",
             openapi_extra=_VARIATION_FORM, response_model=ImagesResponse, responses=ERRORS)
async def create_variation(request: Request) -> Response:
    svc = service_of(request)
    fields, blob = await _form_fields(request)
    keep = _keep(fields.pop("keep", None))
    req, entry, size = _generate_request(svc, request, fields)
    if req.grid is not None:
        raise ProtocolError(400, "invalid_request", "variations are made at the model's size "
                            f"{size}", "size")
    payload = settings_of(svc, entry, req)  # before the upload is encoded
    svc.check_room(entry, "encode")
    tokens = (await encode_uploads(request, svc, entry, [blob]))[0].reshape(-1)
    keep_prefix(payload, tokens[:int(keep * tokens.size)].tolist())
    return await _images(request, svc, entry, payload, size)


# ---- edits: inpainting and outpainting (service/edits.py) -------------------------------------
EDIT_FIELDS = GENERATION_FIELDS | {"image", "mask"}
_EDIT_FORM = {"requestBody": {"required": True, "content": {"multipart/form-data": {
    "schema": {"type": "object", "required": ["image"], "properties": {
        "image": {"type": "string", "format": "binary", "description": (
            "PNG, JPEG or WebP. Without a mask, its transparent pixels are edited.")},
        "mask": {"type": "string", "format": "binary", "description": (
            "PNG with an alpha channel at the image's size: transparent pixels are edited.")},
        "prompt": {"type": "string", "description": "A class, as for generations; \"\": "
                   "unconditional."},
        "model": {"type": "string"}, "n": {"type": "integer", "minimum": 1, "maximum": 64},
        "size": {"type": "string", "description": (
            "\"WxH\": the image's size (default), or larger in whole tokens to extend it, "
            "the image centred.")},
        "response_format": {"type": "string"}, "seed": {"type": "integer"},
        "temperature": {"type": "number"}, "top_k": {"type": "integer"},
        "top_p": {"type": "number"}, "cfg_scale": {"type": "number"}}}}}}}


@router.post("/images/edits", summary="OpenAI: edit or extend an uploaded image",
             openapi_extra=_EDIT_FORM, response_model=ImagesResponse, responses=ERRORS)
async def create_edit(request: Request) -> Response:
    """OpenAI's image edit: the masked cells of the image's tokens are sampled, the rest
    kept; a larger `size` extends the image (centred) into a canvas. The native request is
    /generate with `image`, `mask` and `grid` (the same pixels for the same seed)."""
    svc = service_of(request)
    fields, blob = await _form_fields(request, EDIT_FIELDS, ("image", "image[]"))
    mask = fields.pop("mask", None)
    size = fields.pop("size", None)
    if mask is not None and not isinstance(mask, bytes):
        raise ProtocolError(400, "invalid_request", "mask must be an image file", "mask")
    req, entry, _ = _generate_request(svc, request, {**fields, "prompt": fields.get("prompt", "")})
    limit = svc.settings.max_image_pixels
    with _param_of_errors():
        if mask is not None and not await svc.offload(edits.alpha_checked, mask, limit, "mask",
                                                      pixels=header_pixels([mask])):
            raise ProtocolError(400, "invalid_request", "mask: the mask needs an alpha channel "
                                "(its transparent pixels are edited)", "mask")
        pixels, own = await edits.decode_image(svc, entry, blob)
        shape = edits.cells_of(entry, pixels)
        grid, offset = edits.place(entry, shape, _edit_grid(entry, size, own, pixels), None)
        cells = await edits.image_mask(svc, entry, mask, own, pixels,
                                       alpha_of=blob if mask is None else None)
    if not cells.any() and tuple(grid) == shape:
        raise ProtocolError(400, "invalid_request", "nothing to edit: send a mask with "
                            "transparent pixels, an image with transparent pixels, or a larger "
                            "size to extend it", "mask")
    payload = settings_of(svc, entry, req.model_copy(update={"grid": list(grid)}))
    tokens = await edits.encode_pixels(request, svc, entry, pixels)  # checked: now encode
    keep_cells(payload, edits.Source(tokens, cells, grid, offset).cells())
    f = entry.image_size[0] // entry.grid[0]
    return await _images(request, svc, entry, payload, f"{grid[1] * f}x{grid[0] * f}")


class _param_of_errors:
    """The upload's own errors name their field (OpenAI's `param`): mask or image."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, tb) -> bool:
        if isinstance(error, ServiceError) and not isinstance(error, ProtocolError):
            param = "mask" if error.message.startswith("mask") else "image"
            raise ProtocolError(error.status, error.code, error.message, param) from error
        return False


def _edit_grid(entry: ModelEntry, size, own: tuple[int, int], pixels: np.ndarray
               ) -> list[int] | None:
    """An edit's "WxH" -> its canvas grid: None for the image's own size (or "auto"), else
    whole tokens at least the encoded image's and at most max_grid."""
    if size in (None, "", "auto"):
        return None
    f = entry.image_size[0] // entry.grid[0]
    H, W = pixels.shape[1:3]
    try:
        width, height = (int(v) for v in str(size).lower().split("x"))
    except ValueError:
        width = height = -1
    if (height, width) in ((H, W), tuple(own)):
        return None
    mr, mc = entry.max_grid
    if width < W or height < H or width % f or height % f or width > mc * f or height > mr * f:
        raise ProtocolError(400, "invalid_request", (
            f"size {size!r} is not available: the image is edited at {W}x{H}, or extended to "
            f"a larger canvas in steps of {f} pixels up to {mc * f}x{mr * f}"), "size")
    return [height // f, width // f]


@router.get("/models", summary="OpenAI: the loaded models", response_model=OpenAIModelList,
            responses=error_responses(OpenAIError, 401))
async def openai_models(request: Request) -> Response:
    svc = service_of(request)
    return _json({"object": "list", "data": [_model(e) for e in svc.models.values()]})


@router.get("/models/{model}", summary="OpenAI: one model", response_model=OpenAIModel,
            responses=error_responses(OpenAIError, 400, 401, 404))
async def openai_model(request: Request,
                           model: str = Path(max_length=MAX_NAME, examples=["mnist"])
                           ) -> Response:
    return _json(_model(service_of(request).model(model, request)))


# ---- helpers -----------------------------------------------------------------------------
def _json(obj: dict) -> Response:
    return Response(dumps(obj), media_type="application/json")


def _model(entry: ModelEntry) -> dict:
    h, w = entry.image_size
    return {"id": entry.name, "object": "model", "created": STARTED, "owned_by": "taming",
            "classes": list(entry.bundle.classes), "size": f"{w}x{h}"}


async def _json_fields(request: Request) -> dict:
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        raise ServiceError(415, CODES[415], NOT_JSON)
    try:
        fields = json.loads(await request.body())
    except (ValueError, RecursionError):
        raise ProtocolError(400, "invalid_request", "the body is not valid JSON") from None
    if not isinstance(fields, dict):
        raise ProtocolError(400, "invalid_request", "the body must be a JSON object")
    _only(fields, GENERATION_FIELDS)
    if "prompt" not in fields:
        raise ProtocolError(400, "invalid_request", "prompt is required (a class name or "
                            "index, or \"\" for unconditional images)", "prompt")
    return fields


async def _form_fields(request: Request, known: frozenset = VARIATION_FIELDS,
                      image: tuple[str, ...] = ("image",)) -> tuple[dict, bytes]:
    """The multipart form the openai client sends: the image file (under one of the names
    `image`) and text fields (and, for edits, the mask file)."""
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != "multipart/form-data":
        raise ServiceError(415, CODES[415], "send multipart/form-data with an `image` file")
    try:
        form = await request.form(max_files=2 if "mask" in known else 1,
                                  max_fields=len(known))
    except StarletteHTTPException as e:
        raise ProtocolError(400, "invalid_request", f"bad multipart body: {e.detail}") from e
    try:
        fields: dict = {}
        for key, value in form.multi_items():
            if key in fields:
                raise ProtocolError(400, "invalid_request", f"{key} is given twice", key)
            fields[key] = await value.read() if isinstance(value, UploadFile) else value
    finally:
        await form.close()
    for alias in image[1:]:
        if alias in fields and image[0] not in fields:
            fields[image[0]] = fields.pop(alias)
    _only(fields, known)
    blob = fields.pop("image", None)
    if not isinstance(blob, bytes) or not blob:
        raise ProtocolError(400, "invalid_request", "image is required: upload one image file",
                            "image")
    return fields, blob


def _only(fields: dict, known: frozenset) -> None:
    """Nothing sent is dropped: an unknown field is refused, by name."""
    for key in fields:
        if key not in known:
            raise ProtocolError(400, "invalid_request", f"unknown parameter {key!r}; this "
                                f"endpoint takes {', '.join(sorted(known))}", key)


def _keep(value) -> float:
    if value is None:
        return DEFAULT_KEEP
    try:
        keep = float(value)
    except (TypeError, ValueError):
        keep = -1.0
    if not 0 <= keep < 1:
        raise ProtocolError(400, "invalid_request", "keep must be a number in [0, 1)", "keep")
    return keep


def _generate_request(svc, request: Request, fields: dict
                      ) -> tuple[GenerateRequest, ModelEntry, str]:
    """OpenAI's fields -> the native request (validated by its own model), its model and the
    size answered."""
    form = request.headers.get("content-type", "").startswith("multipart/")
    try:  # form fields are text: read them as /generate's JSON would carry them
        req = GenerateRequest.model_validate({k: fields[k] for k in SAMPLING if k in fields},
                                             strict=not form)
    except ValidationError as e:
        err = e.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else None
        raise ProtocolError(400, "invalid_request", f"{field}: {err['msg']}", field) from None
    fmt = fields.get("response_format")
    if fmt not in (None, "b64_json"):
        raise ProtocolError(400, "unsupported_response_format", (
            f"response_format {fmt!r} is not supported: this server stores no images, so it "
            "has no URLs; use b64_json"), "response_format")
    entry = generator(svc, request, req.model, req.n)
    label = _label(entry, fields.get("prompt", ""))
    h, w = entry.image_size
    size = fields.get("size")
    size = "auto" if size is None else size
    grid = None
    if size != "auto":
        grid = _grid(svc, entry, size)
    else:
        size = f"{w}x{h}"
    return req.model_copy(update={"label": label, "grid": grid}), entry, size


def _label(entry: ModelEntry, prompt) -> int | None:
    """The prompt names a class, by name or index; empty: unconditional."""
    if not isinstance(prompt, str) or len(prompt) > MAX_PROMPT:
        raise ProtocolError(400, "invalid_request", f"prompt must be a string of at most "
                            f"{MAX_PROMPT} characters", "prompt")
    text = prompt.strip()
    if not text:
        return None
    classes = list(entry.bundle.classes)
    try:
        index = text.isascii() and text.isdigit() and text not in classes
        return entry.class_index(int(text) if index else text)
    except ValueError:
        raise ProtocolError(400, "invalid_request", (
            f"prompt {text!r} is no class of model {entry.name!r}: it generates classes "
            f"{classes} (name or index), or unconditional images for an empty prompt"),
            "prompt") from None


def _grid(svc, entry: ModelEntry, size) -> list[int] | None:
    """"WxH" -> the token grid (None for the model's own size)."""
    (h, w), (rows, cols) = entry.image_size, entry.grid
    ds_h, ds_w = h // rows, w // cols
    max_rows, max_cols = entry.max_grid
    match = SIZE.fullmatch(size) if isinstance(size, str) and size.isascii() else None
    if match is None:
        raise ProtocolError(400, "invalid_request", (
            f"size {str(size)[:40]!r} is not \"WxH\": two whole numbers of pixels in ASCII "
            f"digits joined by x, as \"{w}x{h}\""), "size")
    width, height = int(match[1]), int(match[2])
    if (width, height) == (w, h):
        return None
    if (width < w or height < h or width % ds_w or height % ds_h
            or width // ds_w > max_cols or height // ds_h > max_rows):
        raise ProtocolError(400, "invalid_request", (
            f"size {size!r} is not available: model {entry.name!r} makes {w}x{h} images, or "
            f"larger canvases in steps of {ds_w}x{ds_h} pixels up to "
            f"{max_cols * ds_w}x{max_rows * ds_h}"), "size")
    return [height // ds_h, width // ds_w]


async def _images(request: Request, svc, entry: ModelEntry, payload: GeneratePayload,
                  size: str) -> Response:
    _, images = await sample_images(request, svc, entry, payload)
    body = await svc.offload(_images_json, images, payload.seed, size, pixels=images.size)
    return Response(body, media_type="application/json",
                    headers={"X-Seed": str(payload.seed), "X-Model": entry.name})


def _images_json(images: np.ndarray, seed: int, size: str) -> bytes:
    return dumps({"created": int(time.time()), "output_format": "png", "size": size,
                  "data": [{"b64_json": b64png(im), "seed": seed + i}
                           for i, im in enumerate(images)]})
