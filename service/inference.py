"""The steps every way into inference shares. POST /generate, /encode and /decode and the
protocol routes (/v1/images, /v2 infer) call these, so one admission, one set of limits and
checks, the same batching, metrics and access log serve them all, each check once a request:

- `admit`: the model, room in its queue and the checked settings (a `GeneratePayload`);
  `keep_prefix` and `keep_cells` add what an edit or a variation keeps of its source, known
  only once the source is encoded (made from the model's own codes: nothing to check again);
- `sample_images`: the tokens and images of an admitted request (the generation engine, or
  the collector's re-forwarding sampler for an absolute model's wider grid);
- `encode_uploads`: image files to token grids; `check_grids`: token grids of a request.
"""

from __future__ import annotations

import asyncio
import secrets

import numpy as np
from starlette.requests import Request

from models.sampling import FREE, check_settings

from .engine.jobs import GeneratePayload
from .errors import invalid
from .imaging import header_pixels, prepare
from .registry import ModelEntry
from .schemas import GenerateRequest
from .state import Service


# ---- generation -------------------------------------------------------------------------------
def generator(svc: Service, request: Request, name: str | None, n: int) -> ModelEntry:
    """The model that samples, when its queue has room for `n` images (404, 422, 503)."""
    entry = svc.model(name, request)
    if not entry.can_generate:
        raise invalid(f"model {entry.name!r} has no trained transformer; it can only "
                      "/encode and /decode", "generator_unavailable")
    svc.check_room(entry, "generate", n)
    return entry


def admit(svc: Service, request: Request, req: GenerateRequest
          ) -> tuple[ModelEntry, GeneratePayload]:
    """`generator`, then `settings_of` the request."""
    entry = generator(svc, request, req.model, req.n)
    return entry, settings_of(svc, entry, req)


def settings_of(svc: Service, entry: ModelEntry, req: GenerateRequest) -> GeneratePayload:
    """The request's grid and sampling settings, checked against the model (422)."""
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
    return GeneratePayload(settings, seed, req.n, grid, cfg, stepped=svc.can_step(entry, grid))


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


def keep_prefix(payload: GeneratePayload, codes: list[int]) -> None:
    """A variation keeps the first of its source's codes (fewer than the grid holds)."""
    payload.settings["prefix"] = codes or None


def keep_cells(payload: GeneratePayload, cells: np.ndarray) -> None:
    """An edit keeps these cells of its canvas (raster order; FREE: sampled)."""
    payload.settings["cells"] = cells


async def sample_images(request: Request, svc: Service, entry: ModelEntry,
                        payload: GeneratePayload) -> tuple[np.ndarray, np.ndarray]:
    """Tokens (n, T) and images (n, H, W, C) of an admitted request."""
    if payload.stepped:
        tokens, images = await _sampled(request, svc, entry, payload)
    else:  # an absolute model's wider grid: the paper's sampler in the collector's lane
        out = await svc.run(request, entry, "generate", payload.grid, payload, payload.n)
        tokens, images = out["tokens"], out["images"]
    count_sampled(svc, entry, payload)
    return tokens, images


def count_sampled(svc: Service, entry: ModelEntry, payload: GeneratePayload) -> None:
    m = svc.metrics
    m.images_generated.labels(entry.name).inc(payload.n)
    cells = payload.settings.get("cells")  # an edit samples only its FREE cells
    per_image = payload.grid[0] * payload.grid[1] if cells is None else int((cells == FREE).sum())
    m.tokens_sampled.labels(entry.name).inc(payload.n * per_image)


async def _sampled(request: Request, svc: Service, entry: ModelEntry,
                   payload: GeneratePayload) -> tuple[np.ndarray, np.ndarray]:
    """Tokens (n, T) and images from the generation engine; a client that leaves frees its
    rows."""
    job = svc.sample(request, entry, payload)
    watch = asyncio.ensure_future(disconnected(request))
    watch.add_done_callback(lambda w: w.cancelled() or svc.cancel(entry, job, "client_gone"))
    try:
        return await job.future, job.images
    finally:
        watch.cancel()
        svc.cancel(entry, job, "client_gone")  # a cancelled handler: its rows leave too
        svc.log_job(request, job)


async def disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body was read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


# ---- the tokenizer ----------------------------------------------------------------------------
async def encode_uploads(request: Request, svc: Service, entry: ModelEntry,
                         blobs: list[bytes]) -> np.ndarray:
    """Image files -> token grids (N, rows, cols): the upload policy, then the tokenizer's
    batches."""
    x = await svc.offload(prepare, blobs, entry.channels, entry.image_size,
                          svc.settings.max_image_pixels, pixels=header_pixels(blobs))
    out = await svc.run(request, entry, "encode", None, x, len(blobs))
    return out["tokens"]


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
