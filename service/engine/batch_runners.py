"""What the collector's device threads run: `collate` once per batch (on the host), `run`
once per forward (a batch is split into forwards of at most max_batch_size rows, and halves
again on out-of-memory): the copy to the device happens in `run`, inside that split.
"""

from __future__ import annotations

import numpy as np
import torch

from models.sampling import SamplingBatch
from models.slots import sample

from ..registry import ModelEntry
from .jobs import GeneratePayload


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
