"""The previews of streamed rows: each code's decoded patch, looked up, while the answer itself
is decoded whole."""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import torch

from models.gpt import GPT


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
