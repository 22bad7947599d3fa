"""What the client hands back: generations, streamed rows, model metadata and errors."""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image


class TamingError(Exception):
    """An error answer of the server (`{"error": {"code", "message"}}`) or a failed connection.

    `status` is the HTTP status; it is None when the server could not be reached, and for an
    error the server reported inside a stream that had already begun (HTTP 200).
    """

    def __init__(self, status: int | None, code: str, message: str,
                 retry_after: float | None = None) -> None:
        super().__init__(f"{message} ({status or 'no status'}, {code})")
        self.status, self.code, self.message = status, code, message
        self.retry_after = retry_after


def open_png(data: bytes) -> Image.Image:
    """PNG bytes -> a loaded PIL image (the file is read now, not lazily)."""
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def tile(images: list[Image.Image], pad: int = 2) -> Image.Image:
    """Several images -> one mosaic laid out as the server tiles `n > 1` (ceil(sqrt(n))
    columns, row-major, `pad` black pixels apart); one image is returned as it is."""
    if len(images) == 1:
        return images[0]
    w, h = images[0].size
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    out = Image.new(images[0].mode, (cols * (w + pad) - pad, rows * (h + pad) - pad), 0)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        out.paste(im, (c * (w + pad), r * (h + pad)))
    return out


@dataclass
class Generation:
    """The answer of POST /generate: image i was sampled with `seeds[i]` (= seed + i)."""

    model: str
    seed: int
    images: list[Image.Image]
    tokens: list[np.ndarray]  # one (rows, cols) int64 grid per image
    seeds: list[int]
    pngs: list[bytes] = field(repr=False)  # the PNG files exactly as the server sent them

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Generation:
        pngs = [base64.b64decode(im["png"]) for im in body["images"]]
        return cls(model=body["model"], seed=body["seed"], images=[open_png(p) for p in pngs],
                   tokens=[np.asarray(im["tokens"], dtype=np.int64) for im in body["images"]],
                   seeds=[im["seed"] for im in body["images"]], pngs=pngs)

    def mosaic(self) -> Image.Image:
        """All images in one, as the server's PNG answer for the same request shows them."""
        return tile(self.images)

    def save(self, path: str) -> None:
        """One image: its PNG as the server sent it; several: the mosaic."""
        if len(self.pngs) == 1 and str(path).lower().endswith(".png"):
            with open(path, "wb") as f:
                f.write(self.pngs[0])
        else:
            self.mosaic().save(path)


@dataclass
class RowEvent:
    """One token row of one image is complete: its ids and a preview, of the image so far,
    or on a canvas (a grid beyond the model's) of that row's strip alone, whose top pixel row
    is `top`."""

    image: int
    row: int
    tokens: np.ndarray  # the row's ids, (cols,) int64
    preview: Image.Image
    top: int | None = None  # canvases: where the strip goes in the image

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> RowEvent:
        return cls(image=body["image"], row=body["row"],
                   tokens=np.asarray(body["tokens"], dtype=np.int64),
                   preview=open_png(base64.b64decode(body["png"])), top=body.get("top"))


@dataclass
class SamplingDefaults:
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    cfg_scale: float | None = None


@dataclass
class ModelInfo:
    """GET /models/{name}: what a model takes and gives, and its sampling defaults."""

    name: str
    dataset: str | None
    image_size: tuple[int, int]  # (H, W) pixels
    channels: int
    grid: tuple[int, int]  # (rows, cols) of the training token grid
    max_grid: tuple[int, int]
    codebook_size: int
    classes: list[str]
    can_generate: bool
    defaults: SamplingDefaults
    digest: str
    device: str
    n_classes: int = 0  # classes the transformer conditions on
    unconditional: bool = True  # samples without a class
    guidance: bool = True  # takes cfg_scale other than 1
    quantization: str | None = None  # "int8" when served with int8 weights
    memory: dict[str, int] = field(default_factory=dict, repr=False)  # bytes it needs
    evaluation: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> ModelInfo:
        d = body.get("defaults") or {}
        return cls(name=body["name"], dataset=body.get("dataset"),
                   image_size=tuple(body["image_size"]), channels=body["channels"],
                   grid=tuple(body["grid"]), max_grid=tuple(body["max_grid"]),
                   codebook_size=body["codebook_size"], classes=list(body["classes"]),
                   can_generate=body["can_generate"],
                   defaults=SamplingDefaults(**{k: d.get(k) for k in (
                       "temperature", "top_k", "top_p", "cfg_scale")}),
                   digest=body["digest"], device=body["device"],
                   n_classes=body.get("n_classes", 0),
                   unconditional=body.get("unconditional", True),
                   guidance=body.get("guidance", True), quantization=body.get("quantization"),
                   memory=dict(body.get("memory") or {}),
                   evaluation=body.get("evaluation") or {})


@dataclass
class ModelList:
    """GET /models: every loaded model and the name of the default one. Iterates over the
    models; `models_list["mnist"]` picks one by name."""

    models: list[ModelInfo]
    default: str

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> ModelList:
        return cls([ModelInfo.from_json(m) for m in body["models"]], body["default"])

    def __iter__(self) -> Iterator[ModelInfo]:
        return iter(self.models)

    def __len__(self) -> int:
        return len(self.models)

    def __getitem__(self, name: str) -> ModelInfo:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)

    def names(self) -> list[str]:
        return [m.name for m in self.models]
