"""What the device thread runs for each operation: collate payloads, compute rows, return numpy.

The engine calls `collate` once per batch and `run` once per forward (a batch is split into
forwards of at most max_batch_size rows, and halves again on out-of-memory).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from models.sampling import SamplingBatch, make_batch, sample

from .registry import ModelEntry


@dataclass
class GeneratePayload:
    first: SamplingBatch  # image 0, built (and validated) by the handler
    settings: dict  # make_batch keyword arguments (label, temperature, ..., prefix)
    seed: int  # image i uses seed + i
    n: int
    grid: tuple[int, int]


class GenerateRunner:
    operation = "generate"
    # alone on the device: one KV cache per transformer, and a batch samples for hundreds of
    # ms, so the next one may as well keep filling meanwhile
    pipelined = False

    def __init__(self, entry: ModelEntry) -> None:
        self.model = entry.name
        self.gpt = entry.bundle.gpt
        self.tokenizer = entry.tokenizer
        self.device = torch.device(entry.device)

    def collate(self, payloads: list[GeneratePayload]) -> tuple[SamplingBatch, tuple[int, int]]:
        cfg = self.gpt.config
        rows = []
        for p in payloads:
            rows.append(p.first)
            for i in range(1, p.n):  # one generator per image: reproducible alone or batched
                g = torch.Generator().manual_seed(p.seed + i)
                rows.append(make_batch(cfg, 1, p.grid, generator=g, **p.settings))
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
    batch lets go of the GIL, and taking it back waits for the busy event loop (up to a
    switch interval) each time. Torch ops from Python would each add such a wait.
    """

    pipelined = True  # stateless, tens of ms per batch: batches run side by side

    def __init__(self, entry: ModelEntry) -> None:
        self.model = entry.name
        self.tokenizer = entry.tokenizer
        self.device = torch.device(entry.device)
        self.on_cpu = self.device.type == "cpu"

    def collate(self, payloads: list[np.ndarray]) -> torch.Tensor:
        x = torch.from_numpy(payloads[0] if len(payloads) == 1 else np.concatenate(payloads))
        return x if self.on_cpu else x.to(self.device)

    def numpy(self, x: torch.Tensor) -> np.ndarray:
        return x.numpy() if self.on_cpu else x.cpu().numpy()

    @staticmethod
    def rows(batch: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Rows [lo, hi); the batch itself when that is all of it (no slicing op)."""
        return batch if (lo, hi) == (0, len(batch)) else batch[lo:hi]


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
        out["generate"] = GenerateRunner(entry)
    return out
