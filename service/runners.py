"""What the collector's device threads run: collate payloads, compute rows, return numpy.

The collector calls `collate` once per batch (on the host) and `run` once per forward (a
batch is split into forwards of at most max_batch_size rows, and halves again on
out-of-memory): the copy to the device happens in `run`, inside that split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from models.sampling import SamplingBatch, make_batch
from models.slots import sample

from .registry import ModelEntry


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
    """/generate on grids beyond the model's: sliding-window sampling, run to completion."""

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
