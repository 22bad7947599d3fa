"""What the device thread runs for each operation: collate payloads, compute rows, return numpy.

The engine calls `collate` once per batch and `run` once per forward (a batch is split into
forwards of at most max_batch_size rows, and halves again on out-of-memory).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from models.images import to_uint8
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
        images = self.tokenizer.decode(tokens.view(-1, *grid).to(self.device))
        return {"images": to_uint8(images), "tokens": tokens.cpu().numpy()}


class _TokenizerRunner:
    """Shared by encode and decode: both batch tensors along the first axis."""

    pipelined = True  # stateless, tens of ms per batch: batches run side by side

    def __init__(self, entry: ModelEntry) -> None:
        self.model = entry.name
        self.tokenizer = entry.tokenizer
        self.device = torch.device(entry.device)

    def collate(self, payloads: list[torch.Tensor]) -> torch.Tensor:
        x = payloads[0] if len(payloads) == 1 else torch.cat(payloads)
        return x.to(self.device)


class EncodeRunner(_TokenizerRunner):
    operation = "encode"

    def run(self, batch: torch.Tensor, lo: int, hi: int) -> dict[str, np.ndarray]:
        return {"tokens": self.tokenizer.encode(batch[lo:hi]).cpu().numpy()}


class DecodeRunner(_TokenizerRunner):
    operation = "decode"

    def run(self, batch: torch.Tensor, lo: int, hi: int) -> dict[str, np.ndarray]:
        return {"images": to_uint8(self.tokenizer.decode(batch[lo:hi]))}


def runners_for(entry: ModelEntry) -> dict[str, object]:
    out = {"encode": EncodeRunner(entry), "decode": DecodeRunner(entry)}
    if entry.can_generate:
        out["generate"] = GenerateRunner(entry)
    return out
