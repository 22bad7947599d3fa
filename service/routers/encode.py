"""POST /encode: images in, token grids out (the upload policy is in service/imaging.py)."""

from __future__ import annotations

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from ..deps import service_of
from ..errors import ServiceError, invalid
from ..imaging import MEDIA_TYPES
from ..inference import encode_uploads
from ..responses import encode_json
from ..schemas import MAX_NAME, EncodeResponse
from . import errors

_BINARY = {"schema": {"type": "string", "format": "binary"}}
REQUEST_BODY = {"requestBody": {"required": True, "description": (
    "One image as raw bytes (image/png, image/jpeg or image/webp), or multipart/form-data "
    "with one or more image files (any field names). Images are converted to the model's "
    "channels (alpha composited onto black) and padded to its aspect ratio, then resized to "
    "its image size. Animated images are refused."), "content": {
    "image/png": _BINARY, "image/jpeg": _BINARY, "image/webp": _BINARY,
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
}}}


async def _read_uploads(request: Request, max_images: int) -> list[bytes]:
    ctype = request.headers.get("content-type", "")
    base = ctype.split(";", 1)[0].strip().lower()
    if base == "multipart/form-data":
        try:
            form = await request.form(max_files=max_images, max_fields=max_images)
        except StarletteHTTPException as e:
            raise invalid(f"bad multipart body: {e.detail}") from e
        try:
            blobs = [await v.read() for _, v in form.multi_items() if isinstance(v, UploadFile)]
        finally:
            await form.close()
        if not blobs:
            raise invalid("the multipart body holds no files")
        return blobs
    if base in MEDIA_TYPES:
        body = await request.body()
        if not body:
            raise invalid("empty body: send the image bytes")
        return [body]
    raise ServiceError(415, "unsupported_media_type",
                       f"Content-Type {base or 'missing'!s} is not supported; send image/png, "
                       "image/jpeg, image/webp or multipart/form-data")


MODEL_PARAM = {"name": "model", "in": "query", "required": False, "description": (
    "Model name; default: the server's default model."),
    "schema": {"type": "string", "maxLength": MAX_NAME}}


def model_param(request: Request) -> str | None:
    """`?model=`, read here rather than by a FastAPI parameter: dependency solving costs the
    event loop more per request than this whole handler (BENCHMARKS.md)."""
    name = request.query_params.get("model")
    if name is not None and len(name) > MAX_NAME:
        raise invalid(f"query.model: String should have at most {MAX_NAME} characters")
    return name


# how /docs shows the route (service.app.INFERENCE_ROUTES serves it)
DOCS = {"summary": "Tokenize images", "response_model": EncodeResponse,
        "openapi_extra": {**REQUEST_BODY, "parameters": [MODEL_PARAM]},
        "responses": errors(401, 404, 413, 415, 422, 503, 504)}


async def encode(request: Request) -> Response:
    svc = service_of(request)
    entry = svc.model(model_param(request), request)
    svc.check_room(entry, "encode")  # before any multipart parsing or image decoding
    blobs = await _read_uploads(request, svc.settings.max_images)
    tokens = await encode_uploads(request, svc, entry, blobs)
    return Response(encode_json(entry.name, tokens), media_type="application/json")
