"""Request, response and error models: the HTTP contract of docs/api.md, as shown in /docs.

Requests are strict: integers must be JSON integers (no 1.0, no "1", no true), numbers must
be finite (no NaN or Infinity), and unknown fields are refused, each with a 422.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from models.sampling import MAX_CFG_SCALE, MAX_TEMPERATURE, MIN_TEMPERATURE

MAX_N = 64
MAX_SEED = 2**53 - 1  # the largest integer every JSON parser reads exactly (RFC 8259, section 6)
MAX_NAME = 128
MAX_PREFIX = 64 * 64  # a bound for parsing; the real limit is the grid's cell count
MAX_SOURCE_ROWS = 256  # a bound for parsing; the real limit is the model's max_grid

STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class ErrorDetail(BaseModel):
    code: str = Field(description="Machine-readable code, e.g. invalid_request, overloaded.")
    message: str = Field(description="What went wrong, for humans.")


class ErrorBody(BaseModel):
    error: ErrorDetail

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"error": {"code": "invalid_request", "message": "n: Input should be less than or "
                   "equal to 64"}}]})


class GenerateRequest(BaseModel):
    model_config = ConfigDict(**STRICT, json_schema_extra={"examples": [
        {"model": "mnist", "n": 4, "label": 7, "seed": 1234},
        {"model": "fashion-mnist", "label": "Sneaker", "temperature": 0.9, "top_k": 100,
         "seed": 7, "grid": [7, 14]},
    ]})

    model: str | None = Field(None, max_length=MAX_NAME, description=(
        "Model name; default: the server's default model."))
    n: int = Field(1, ge=1, le=MAX_N, description="Number of images (1..64).")
    label: int | str | None = Field(None, description=(
        "Class index or class name; omitted = unconditional."))
    temperature: float | None = Field(None, ge=MIN_TEMPERATURE, le=MAX_TEMPERATURE, description=(
        f"{MIN_TEMPERATURE:g}..{MAX_TEMPERATURE:g}; default: the model's."))
    top_k: int | None = Field(None, ge=1, description="1..K (K = codebook size); default: off.")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus mass in (0, 1].")
    cfg_scale: float | None = Field(None, ge=-MAX_CFG_SCALE, le=MAX_CFG_SCALE, description=(
        "Classifier-free guidance scale; 1 = off (default: the model's)."))
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description=(
        "Seed of image 0; image i uses seed + i. Omitted: random, returned in X-Seed."))
    grid: list[int] | None = Field(None, min_length=2, max_length=2, description=(
        "[rows, cols] of tokens; default the model's grid; larger = a canvas (sliding-window "
        "sampling: cached and streamable for relative-position models), up to the model's "
        "max_grid (see GET /models/{name})."))
    prefix: list[int] | list[list[int]] | None = Field(None, max_length=MAX_PREFIX, description=(
        "Token ids to keep, in raster order: a flat list, or rows of the grid (the last row "
        "may be partial). The sampler completes the rest."))
    # editing a source (service/edits.py): inpainting with `mask`, outpainting with `grid`
    tokens: list[list[int]] | None = Field(None, max_length=MAX_SOURCE_ROWS, description=(
        "A source token grid to edit (rows of ids in [0, K), rectangular, up to max_grid)."))
    image: str | None = Field(None, description=(
        "A source image to edit: base64 PNG, JPEG or WebP (or a data: URL), encoded with "
        "the model's tokenizer first (at its own size when it is whole tokens, else fitted "
        "to the model's image size as /encode does). Multipart bodies send it as a file."))
    mask: str | Annotated[list[list[bool]], Field(max_length=MAX_SOURCE_ROWS)] | None = Field(
        None, description=(
        "The region of the source to sample: a base64 PNG at the image's size whose "
        "transparent pixels (with an alpha channel) or else black ones mark it, or a boolean "
        "grid of the source's cells (true: sample). Omitted: keep every source cell."))
    offset: list[int] | None = Field(None, min_length=2, max_length=2, description=(
        "[row, col] of the source's top-left cell in the canvas `grid`, in cells (default: "
        "centred); every canvas cell outside the source is sampled (outpainting)."))


class GeneratedImage(BaseModel):
    png: str = Field(description="Base64-encoded PNG.")
    tokens: list[list[int]] = Field(description="The token grid, rows x cols.")
    seed: int = Field(description="Seed that reproduces this image alone (n=1).")


class GenerateResponse(BaseModel):
    model: str
    seed: int
    images: list[GeneratedImage]


class DecodeRequest(BaseModel):
    model_config = ConfigDict(**STRICT, json_schema_extra={"examples": [
        {"model": "mnist", "tokens": [[1, 2, 3, 4, 5, 6, 7]] * 7},
    ]})

    model: str | None = Field(None, max_length=MAX_NAME, description=(
        "Model name; default: the server's default model."))
    tokens: list[list[int]] | list[list[list[int]]] = Field(description=(
        "One token grid (rows of ids in [0, K)) or a list of grids of one shape; any size up "
        "to [max_grid, max_grid]."))


class ImagePNG(BaseModel):
    png: str = Field(description="Base64-encoded PNG.")


class DecodeResponse(BaseModel):
    model: str
    shape: list[int] = Field(description="[rows, cols] of the decoded grids.")
    images: list[ImagePNG]


class EncodeResponse(BaseModel):
    model: str
    shape: list[int] = Field(description="[rows, cols] of each token grid.")
    tokens: list[list[list[int]]] = Field(description="One grid per uploaded image.")

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"model": "mnist", "shape": [7, 7], "tokens": [[[12, 200, 7, 7, 7, 7, 7]] * 7]}]})


class SamplingDefaults(BaseModel):
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    cfg_scale: float | None = None


class ModelInfo(BaseModel):
    name: str
    dataset: str | None = None
    image_size: list[int] = Field(description="[H, W] in pixels.")
    channels: int
    grid: list[int] = Field(description="[rows, cols] of the training token grid.")
    max_grid: list[int] = Field(description="Largest [rows, cols] /generate and /decode accept.")
    codebook_size: int
    classes: list[str] = Field(description="Class names in index order.")
    can_generate: bool = Field(description="False when the folder holds only the tokenizer.")
    n_classes: int = Field(0, description="Classes the transformer conditions on (0: none).")
    unconditional: bool = Field(True, description=(
        "Whether /generate takes no label (false: a class-conditional model trained without a "
        "null class, such as the paper's ImageNet transformer)."))
    guidance: bool = Field(True, description=(
        "Whether cfg_scale other than 1 is accepted (false: trained without a null class)."))
    defaults: SamplingDefaults
    digest: str = Field(description="Digest of the weight files.")
    device: str
    quantization: str | None = Field(None, description=(
        "How the transformer's weights are held when not as trained (int8: TAMING_QUANTIZE)."))
    evaluation: dict[str, Any] = Field(description="Measured results from config.json.")
    memory: dict[str, int] = Field(default_factory=dict, description=(
        "What the model holds: weights_bytes, kv_cache_bytes (its generation slots' static "
        "KV cache), total_bytes, and slots (images sampled at once; TAMING_GENERATE_SLOTS, "
        "or fewer where the device's free memory holds fewer)."))


class ModelList(BaseModel):
    models: list[ModelInfo]
    default: str


class Health(BaseModel):
    status: str = Field(examples=["ok"])


class Ready(BaseModel):
    status: str = Field(examples=["ready"])
    models: list[str]
