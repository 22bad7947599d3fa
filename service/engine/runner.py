"""Everything that runs on the device: a lane's step runner, the batches' runners, and the
out-of-memory split both use.

`StepRunner` owns one lane's `SlotSampler` (its rows' state and KV cache) and the compiled
steps: it seats images, moves and frees rows, runs a step, copies codes back and decodes.
The batch runners are what the collector's device threads run: `collate` once per batch (on
the host), `run` once per forward (a batch is split into forwards of at most
max_batch_size rows, and halves again on out-of-memory): the copy to the device happens in
`run`, inside that split.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from models.canvas import CanvasSampler
from models.gpt import GPT
from models.sampling import SamplingBatch, make_batch
from models.slots import SlotSampler, compiled_steps, sample, step_variants

from ..errors import RETRY_AFTER, ServiceError
from ..metrics import Metrics
from ..registry import ModelEntry
from .scheduler import Image

log = logging.getLogger("taming.engine")


# ---- out of memory ----------------------------------------------------------------------------
def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and "out of memory" in str(e))


def split_on_oom(run: Callable[[int, int], Any], lo: int, hi: int,
                 on_split: Callable[[int, int], None] | None = None,
                 on_single: Callable[[BaseException], BaseException] | None = None,
                 ) -> list[tuple[int, int, Any]]:
    """Out-of-memory on rows [lo, hi): split them in halves and retry each, down to one row.

    Returns [(lo, hi, result or exception)] covering [lo, hi) in order. Errors other than
    OOM propagate. `on_split(lo, hi)` is told of each split; `on_single(error)` turns an OOM
    on a single row into what its request gets (default: the error itself)."""
    try:
        return [(lo, hi, run(lo, hi))]
    except Exception as e:
        if not is_oom(e):
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if hi - lo == 1:
            return [(lo, hi, on_single(e) if on_single else e)]
        if on_split is not None:
            on_split(lo, hi)
        mid = (lo + hi) // 2
        return (split_on_oom(run, lo, mid, on_split, on_single)
                + split_on_oom(run, mid, hi, on_split, on_single))


def too_big(model: str, operation: str) -> ServiceError:
    """What an image gets that runs out of memory even alone."""
    log.error("out of memory on a single image of %s/%s", model, operation)
    return ServiceError(503, "out_of_memory", "out of memory even for one image", RETRY_AFTER)


# ---- a lane's device side -------------------------------------------------------------------
class StepRunner:
    """One lane's rows on the device and the steps over them."""

    def __init__(self, name: str, gpt: GPT, capacity: int, metrics: Metrics) -> None:
        cfg = gpt.config
        self.name = name
        self.metrics = metrics
        self.sampler = SlotSampler(gpt, capacity)
        self.device = self.sampler.out.device
        self.rows, self.cols = cfg.grid
        self.seq_len = cfg.seq_len
        self.null_class = cfg.null_class
        # compiled, by (padded size, filtered)
        self.steps: dict[tuple[int, bool], Callable[[int, bool], None]] = {}
        self.variants = step_variants(self.device.type)

    @property
    def sizes(self) -> tuple[int, ...]:
        return self.sampler.sizes

    @property
    def capacity(self) -> int:
        return self.sampler.capacity

    def prepare(self, compile: bool, compile_deadline: float) -> int:
        """Compile (optionally) and run every padded size once; returns how many step graphs
        were left eager because `compile_deadline` (time.monotonic()) passed. Runners of one
        GPT share its graphs, so only the first compiles; the others find them ready."""
        compiled = compiled_steps(self.sampler) if compile else None
        # three calls each: on CUDA a first call warms up and the second records the graph;
        # on CPU TorchScript's executor profiles the second and third (10-40 ms each), which
        # a lane serving its first load would otherwise pay
        calls = 3
        wanted = [(size, f) for size in self.sampler.sizes for f in self.variants]
        for size, filtered in wanted:
            if compiled is not None and time.monotonic() < compile_deadline:
                for _ in range(calls):
                    compiled(size, filtered)
                self.steps[size, filtered] = compiled
            else:
                self.sampler(size, filtered)
        self.sampler.release(list(range(self.sampler.capacity)))
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return len(wanted) - len(self.steps) if compiled is not None else 0

    def admit(self, images: list[Image]) -> None:
        """Seated images' rows take their seeded settings and start at position 0."""
        batches = [im.job.image(im.index) for im in images]
        self.sampler.admit([im.cond for im in images], [im.uncond for im in images],
                           batches[0] if len(batches) == 1 else SamplingBatch.cat(batches),
                           self.null_class)

    def move(self, src: list[int], dst: list[int]) -> None:
        if src:
            self.sampler.move(src, dst)

    def release(self, rows: list[int]) -> None:
        self.sampler.release(rows)

    def step(self, size: int, filtered: bool) -> None:
        """One token for rows [0, size); without the sort when no row filters (where that
        variant exists: it picks the same codes)."""
        filtered = filtered or False not in self.variants
        self.steps.get((size, filtered), self.sampler)(size, filtered)

    def codes(self, images: list[Image]) -> dict[int, np.ndarray]:
        """The codes picked so far by these images' rows, on the host, by row."""
        out = self.sampler.out
        wanted = sorted({im.cond for im in images})
        host = out[wanted].cpu().numpy() if out.device.type != "cpu" else out[wanted].numpy()
        return {r: host[i] for i, r in enumerate(wanted)}

    def pictures(self, rows: list[Image], finished: list[Image], codes: dict[int, np.ndarray],
                 decode: Callable[[torch.Tensor], torch.Tensor], patches: Patches
                 ) -> dict[int, Any]:
        """Finished images, decoded in one batch, and the previews of streamed rows, by id of
        the image. A preview shows each code's patch for the rows so far, black below (a
        lookup, not a decode); the row that finishes an image shows the decoded image. An
        image that could not be decoded has its ServiceError in its place."""
        out: dict[int, Any] = {}
        if finished:
            images = self.decode(np.stack([codes[im.cond] for im in finished]), decode)
            out = {id(im): image for im, image in zip(finished, images, strict=True)}
        for im in rows:
            if im.job.on_row is not None and id(im) not in out:
                out[id(im)] = patches.grid(codes[im.cond], im.pos, (self.rows, self.cols))
        return out

    def decode(self, grids: np.ndarray, decode: Callable[[torch.Tensor], torch.Tensor]
               ) -> list[np.ndarray | ServiceError]:
        """uint8 images of `grids`, halved on out-of-memory; an image that does not fit even
        alone gets a 503 in its place (its request fails, the others carry on)."""
        x = torch.from_numpy(grids).view(len(grids), self.rows, self.cols).to(self.device)
        m = self.metrics

        def run(lo: int, hi: int) -> np.ndarray:
            t0 = time.perf_counter()
            images = decode(x[lo:hi]).cpu().numpy()
            m.batch_duration.labels("decode", self.name).observe(time.perf_counter() - t0)
            m.batch_size.labels("decode", self.name).observe(hi - lo)
            return images

        def split(lo: int, hi: int) -> None:
            m.oom_splits.labels("decode", self.name).inc()
            log.warning("out of memory decoding %d images of %s: splitting", hi - lo, self.name)

        out: list[np.ndarray | ServiceError] = []
        for lo, hi, r in split_on_oom(run, 0, len(x), split,
                                      lambda e: too_big(self.name, "decode")):
            out.extend([r] * (hi - lo) if isinstance(r, ServiceError) else list(r))
        return out


# ---- previews -------------------------------------------------------------------------------
class Patches:
    """Each code's decoded patch, for the previews of streamed rows: a lookup, while the
    answer itself is decoded whole. A code's patch is decoded the first time a preview shows
    it (the codebooks of imported models run to 16,384 codes, too many to decode at start-up)
    and kept; lanes share one table."""

    BATCH = 64  # codes decoded at once: bounds the decoder's memory for a large codebook

    def __init__(self, gpt: GPT, decode: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.K = gpt.config.codebook_size
        self.device = next(gpt.parameters()).device
        self.decode = decode
        self.table: np.ndarray | None = None  # (K, f, f, C) uint8, once a first patch is known
        self.known = np.zeros(self.K, dtype=bool)
        self.lock = threading.Lock()

    def _lookup(self, codes: np.ndarray) -> np.ndarray:
        """The patches of `codes` (N, f, f, C), decoding those not yet known: each code amid
        copies of itself, its centre kept."""
        with self.lock:
            missing = np.unique(codes[~self.known[codes]])
            for i in range(0, len(missing), self.BATCH):
                part = torch.from_numpy(missing[i:i + self.BATCH]).to(self.device)
                tiles = self.decode(part[:, None, None].expand(len(part), 3, 3)
                                    .contiguous()).cpu().numpy()
                f = tiles.shape[1] // 3
                if self.table is None:
                    self.table = np.zeros((self.K, f, f, tiles.shape[3]), dtype=tiles.dtype)
                self.table[missing[i:i + self.BATCH]] = tiles[:, f:2 * f, f:2 * f]
                self.known[missing[i:i + self.BATCH]] = True
            return self.table[codes]

    def strip(self, codes: np.ndarray) -> np.ndarray:
        """The pixels of one token row of codes: each code's patch, side by side."""
        patches = self._lookup(codes)  # (W, f, f, C)
        return np.ascontiguousarray(patches.transpose(1, 0, 2, 3).reshape(
            patches.shape[1], -1, patches.shape[3]))

    def grid(self, codes: np.ndarray, cells: int, grid: tuple[int, int]) -> np.ndarray:
        """An image of `grid` whose first `cells` (whole token rows) show their codes'
        patches, black below."""
        rows, cols = grid
        done = cells // cols
        patches = self._lookup(codes[:done * cols])
        f, C = patches.shape[1], patches.shape[3]
        image = np.zeros((rows * f, cols * f, C), dtype=patches.dtype)
        image[:done * f] = patches.reshape(done, cols, f, f, C).transpose(0, 2, 1, 3, 4).reshape(
            done * f, cols * f, C)
        return image


# ---- a lane's canvas ------------------------------------------------------------------------
class CanvasRunner:
    """The device side of canvases (grids beyond the model's, for a relative model), shared
    by an engine's lanes: a canvas's sampler, the strips of its rows, its decoded image."""

    # one whole-canvas decode at a time in the process: its peak memory (the decoder's
    # full-resolution activations) is what a replica must hold once, not once per lane
    decoding = threading.Lock()

    def __init__(self, name: str, gpt: GPT, metrics: Metrics) -> None:
        self.name = name
        self.gpt = gpt
        self.metrics = metrics

    def start(self, image: Image) -> CanvasSampler:
        """The canvas of one image of a job, with its seeded row (built here, off the loop)."""
        return CanvasSampler(self.gpt, image.job.image(image.index), image.job.grid)

    def picture(self, sampler: CanvasSampler, decode: Callable[[torch.Tensor], torch.Tensor]
                ) -> np.ndarray | ServiceError:
        """The canvas decoded whole (the tokenizer's normalisation sees all of it, as a
        /decode of its tokens would); 503 when it does not fit in memory."""
        t0 = time.perf_counter()
        try:
            with self.decoding:
                image = decode(sampler.codes.view(1, *sampler.grid)).cpu().numpy()[0]
        except Exception as e:
            if not is_oom(e):
                raise
            return too_big(self.name, "decode")
        self.metrics.batch_duration.labels("decode", self.name).observe(time.perf_counter() - t0)
        self.metrics.batch_size.labels("decode", self.name).observe(1)
        return image


# ---- the batches' runners ---------------------------------------------------------------------
@dataclass
class GeneratePayload:
    """One /generate request's sampling settings, checked by the handler; the rows are built
    where they run (a lane, or the collector's thread), off the event loop."""

    settings: dict  # make_batch keyword arguments (label, temperature, ..., prefix)
    seed: int  # image i uses seed + i
    n: int
    grid: tuple[int, int]
    model_cfg: Any  # the GPT's config

    def image(self, i: int) -> SamplingBatch:
        """Image i's row, from its own generator: the same tokens alone or in any batch."""
        g = torch.Generator().manual_seed(self.seed + i)
        return make_batch(self.model_cfg, 1, self.grid, generator=g, **self.settings)

    @property
    def guided(self) -> bool:
        return self.settings["cfg_scale"] != 1

    @property
    def filtered(self) -> bool:
        """Whether its picks use top-k or top-p (the engine then steps with the sort)."""
        k = self.settings["top_k"]
        return (k is not None and k < self.model_cfg.codebook_size) or self.settings["top_p"] < 1


class WideGenerateRunner:
    """/generate on grids beyond the model's for absolute-position models: the paper's
    sliding-window sampling, run to completion (relative models sample canvases in lanes)."""

    operation = "generate"
    # a batch samples for seconds and re-forwards its windows (no cache to share): the next
    # one may as well keep filling meanwhile
    pipelined = False

    def __init__(self, entry: ModelEntry) -> None:
        self.model = entry.name
        self.gpt = entry.bundle.gpt
        self.tokenizer = entry.tokenizer
        self.device = torch.device(entry.device)

    def collate(self, payloads: list[GeneratePayload]) -> tuple[SamplingBatch, tuple[int, int]]:
        rows = [p.image(i) for p in payloads for i in range(p.n)]
        batch = rows[0] if len(rows) == 1 else SamplingBatch.cat(rows)
        return batch, payloads[0].grid

    def run(self, batch: tuple[SamplingBatch, tuple[int, int]], lo: int, hi: int
            ) -> dict[str, np.ndarray]:
        rows, grid = batch
        part = rows if (lo, hi) == (0, len(rows)) else rows.rows(lo, hi)
        tokens = sample(self.gpt, part, grid)
        images = self.tokenizer.decode_pixels(tokens.view(-1, *grid).to(self.device))
        return {"images": images.cpu().numpy(), "tokens": tokens.cpu().numpy()}


class _TokenizerRunner:
    """Shared by encode and decode: numpy payloads stacked along the first axis.

    Numpy in, one tokenizer call, numpy out: on CPU that call is the only point where the
    batch lets go of the GIL, where torch ops from Python would each take it back.
    On CUDA the batch waits in pinned memory, goes over with a non-blocking copy, and the
    result comes back with one synchronisation.
    """

    pipelined = True  # stateless, short batches: they run side by side

    def __init__(self, entry: ModelEntry) -> None:
        self.model = entry.name
        self.tokenizer = entry.tokenizer
        self.device = torch.device(entry.device)
        self.on_cpu = self.device.type == "cpu"

    def collate(self, payloads: list[np.ndarray]) -> torch.Tensor:
        x = torch.from_numpy(payloads[0] if len(payloads) == 1 else np.concatenate(payloads))
        return x if self.on_cpu else x.pin_memory()

    def rows(self, batch: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Rows [lo, hi) on the device; the batch itself when that is all of it on CPU."""
        part = batch if (lo, hi) == (0, len(batch)) else batch[lo:hi]
        return part if self.on_cpu else part.to(self.device, non_blocking=True)

    def numpy(self, x: torch.Tensor) -> np.ndarray:
        return x.numpy() if self.on_cpu else x.cpu().numpy()


class EncodeRunner(_TokenizerRunner):
    """Payload: uint8 pixels (n, H, W, C)."""

    operation = "encode"

    def run(self, batch: torch.Tensor, lo: int, hi: int) -> dict[str, np.ndarray]:
        return {"tokens": self.numpy(self.tokenizer.encode_pixels(self.rows(batch, lo, hi)))}


class DecodeRunner(_TokenizerRunner):
    """Payload: int64 token grids (n, rows, cols), ids already checked."""

    operation = "decode"

    def run(self, batch: torch.Tensor, lo: int, hi: int) -> dict[str, np.ndarray]:
        return {"images": self.numpy(self.tokenizer.decode_pixels(self.rows(batch, lo, hi)))}


def runners_for(entry: ModelEntry) -> dict[str, object]:
    out = {"encode": EncodeRunner(entry), "decode": DecodeRunner(entry)}
    if entry.can_generate:
        out["generate"] = WideGenerateRunner(entry)
    return out
