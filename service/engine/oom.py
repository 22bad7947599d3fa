"""Out of memory on the device: the split both the lanes' decodes and the batches use."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from ..errors import RETRY_AFTER, ServiceError

log = logging.getLogger("taming.engine")


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
