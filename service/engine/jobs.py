"""The request objects of the generation engine (nano-vllm's `Sequence`, per request).

A `GeneratePayload` is what a /generate handler checked; the engine turns it into one
`GenerateJob`, the single source of truth for that request (which images are done, whether
it was cancelled, the future its handler awaits), and one `Image` per image it asks for,
which waits in the engine's queue and then holds a lane's rows (or is the lane's canvas).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from models.sampling import SamplingBatch, build_batch


@dataclass
class GeneratePayload:
    """One /generate request's sampling settings, checked by the handler; the rows are built
    where they run (a lane, or the collector's thread), off the event loop."""

    settings: dict  # make_batch keyword arguments (label, temperature, ..., prefix), checked
    seed: int  # image i uses seed + i
    n: int
    grid: tuple[int, int]
    model_cfg: Any  # the GPT's config
    stepped: bool = True  # the generation engine samples it (else the collector's sampler)

    def image(self, i: int) -> SamplingBatch:
        """Image i's row, from its own generator: the same tokens alone or in any batch."""
        g = torch.Generator().manual_seed(self.seed + i)
        return build_batch(self.model_cfg, 1, self.grid, generator=g, **self.settings)

    @property
    def guided(self) -> bool:
        return self.settings["cfg_scale"] != 1

    @property
    def filtered(self) -> bool:
        """Whether its picks use top-k or top-p (the engine then steps with the sort)."""
        k = self.settings["top_k"]
        return (k is not None and k < self.model_cfg.codebook_size) or self.settings["top_p"] < 1


@dataclass(eq=False, repr=False)
class GenerateJob:
    """One /generate request in the engine. Lanes touch it under the engine's lock."""

    n: int
    image: Callable[[int], SamplingBatch]  # image i's seeded one-row batch (built by a lane)
    guided: bool
    grid: tuple[int, int]
    future: asyncio.Future
    arrival: float
    filtered: bool  # uses top-k or top-p: its lane steps with the sort
    # (image, row, tokens, preview): the preview decodes the rows so far, black below
    on_row: Callable[[int, int, np.ndarray, np.ndarray], None] | None = None
    tokens: np.ndarray = field(init=False)
    images: np.ndarray | None = None  # (n, H, W, C) uint8, filled as images finish
    left: int = field(init=False)  # images not finished
    cancelled: str | None = None  # why it must leave (client_gone, deadline)
    started: float | None = None  # when its first image took rows or a canvas (loop.time())
    first_row: float | None = None
    finished: float | None = None
    company: int = 0  # images sampling in its lane at its first step
    timeout_s: float = 0.0  # the request timeout: to start, and to finish unless a canvas
    since: float = 0.0  # when the request arrived (its header; loop.time()): deadlines count
    cells: int = 0  # canvas cells in all its images (0: not a canvas)
    cells_done: int = 0  # canvas cells sampled so far (lanes add, under the engine's lock)
    cells_checked: int = 0  # cells_done at the last deadline check

    def __post_init__(self) -> None:
        self.tokens = np.zeros((self.n, self.grid[0] * self.grid[1]), dtype=np.int64)
        self.left = self.n

    def deliver(self, index: int, codes: np.ndarray, image: np.ndarray) -> bool:
        """Image `index` is done (under the engine's lock: two lanes may finish images of
        one job at once); True when it was the job's last."""
        self.tokens[index] = codes
        if self.images is None:
            self.images = np.zeros((self.n, *image.shape), dtype=image.dtype)
        self.images[index] = image
        self.left -= 1
        return self.left == 0


@dataclass(eq=False)
class Image:
    """One image of a job, while it waits, holds rows, or is a lane's canvas."""

    job: GenerateJob  # guided, filtered, on_row, first_row and cancelled are read
    index: int  # its place in the job (image i samples with seed + i)
    cond: int = -1  # its row; it carries the image's settings
    uncond: int | None = None  # its guidance partner's row, when guided
    pos: int = 0  # cells picked so far

    @property
    def rows(self) -> list[int]:
        return [self.cond] if self.uncond is None else [self.cond, self.uncond]
