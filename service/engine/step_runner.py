"""A lane's rows on the device: the `SlotSampler` (their sampling state and KV cache, a
`RowCache`) with the compiled steps over it, the seeding of joining images, and the decode
of finished ones.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from models.gpt import GPT
from models.sampling import SamplingBatch
from models.slots import SlotSampler, compiled_steps, step_variants

from ..errors import ServiceError
from ..metrics import Metrics
from .jobs import Image
from .oom import split_on_oom, too_big
from .previews import Patches

log = logging.getLogger("taming.engine")


class StepRunner(SlotSampler):
    """One lane's rows and the steps over them: the slot sampler, plus what the lane needs of
    it (compiled steps by padded size, images in and codes and pictures out)."""

    def __init__(self, name: str, gpt: GPT, capacity: int, metrics: Metrics) -> None:
        super().__init__(gpt, capacity)
        cfg = gpt.config
        self.name = name
        self.metrics = metrics
        self.device = self.out.device
        self.grid = tuple(cfg.grid)
        self.cols = cfg.grid[1]
        self.seq_len = cfg.seq_len
        self.null_class = cfg.null_class
        # compiled, by (padded size, filtered)
        self.steps: dict[tuple[int, bool], Callable[[int, bool], None]] = {}
        self.variants = step_variants(self.device.type)

    def prepare(self, compile: bool, compile_deadline: float) -> int:
        """Compile (optionally) and run every padded size once; returns how many step graphs
        were left eager because `compile_deadline` (time.monotonic()) passed. Runners of one
        GPT share its graphs, so only the first compiles; the others find them ready."""
        compiled = compiled_steps(self) if compile else None
        # three calls each: on CUDA a first call warms up and the second records the graph;
        # on CPU TorchScript's executor profiles the second and third (10-40 ms each), which
        # a lane serving its first load would otherwise pay
        calls = 3
        wanted = [(size, f) for size in self.sizes for f in self.variants]
        for size, filtered in wanted:
            if compiled is not None and time.monotonic() < compile_deadline:
                for _ in range(calls):
                    compiled(size, filtered)
                self.steps[size, filtered] = compiled
            else:
                self(size, filtered)
        self.release(list(range(self.capacity)))
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return len(wanted) - len(self.steps) if compiled is not None else 0

    def seed(self, images: list[Image]) -> None:
        """Seated images' rows take their seeded settings and start at position 0."""
        if not images:
            return
        batches = [im.job.image(im.index) for im in images]
        self.admit([im.cond for im in images], [im.uncond for im in images],
                   batches[0] if len(batches) == 1 else SamplingBatch.cat(batches),
                   self.null_class)

    def step(self, size: int, filtered: bool) -> None:
        """One token for rows [0, size); without the sort when no row filters (where that
        variant exists: it picks the same codes)."""
        filtered = filtered or False not in self.variants
        self.steps.get((size, filtered), self)(size, filtered)

    def codes(self, images: list[Image]) -> dict[int, np.ndarray]:
        """The codes picked so far by these images' rows, on the host, by row."""
        out = self.out
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
                out[id(im)] = patches.grid(codes[im.cond], im.pos, self.grid)
        return out

    def decode(self, grids: np.ndarray, decode: Callable[[torch.Tensor], torch.Tensor]
               ) -> list[np.ndarray | ServiceError]:
        """uint8 images of `grids`, halved on out-of-memory; an image that does not fit even
        alone gets a 503 in its place (its request fails, the others carry on)."""
        x = torch.from_numpy(grids).view(len(grids), *self.grid).to(self.device)
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
