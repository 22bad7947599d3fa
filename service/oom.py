"""Out-of-memory on a batch: split it in halves and retry each, down to one image.

Pure: `run(lo, hi)` computes rows [lo, hi); what comes back covers [lo, hi) in order, each
piece a result or the error that one image could not get past.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and "out of memory" in str(e))


def split_on_oom(run: Callable[[int, int], Any], lo: int, hi: int,
                 on_split: Callable[[int, int], None] | None = None,
                 on_single: Callable[[BaseException], BaseException] | None = None,
                 ) -> list[tuple[int, int, Any]]:
    """[(lo, hi, result or exception)] covering [lo, hi). Errors other than OOM propagate.

    `on_split(lo, hi)` is told of each split; `on_single(error)` turns an OOM on a single
    row into what its request gets (default: the error itself)."""
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
