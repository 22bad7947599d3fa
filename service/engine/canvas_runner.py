"""The device side of a lane's canvas (a grid beyond the model's, for a relative model):
its sampler, which holds the canvas's keys in a `CanvasCache`, and its whole decode."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np
import torch

from models.canvas import CanvasSampler
from models.gpt import GPT

from ..errors import ServiceError
from ..metrics import Metrics
from .jobs import Image
from .oom import is_oom, too_big


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
