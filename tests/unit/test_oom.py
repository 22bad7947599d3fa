"""Out-of-memory splitting (service.engine.oom), on its own: halves until each piece fits, one image
that cannot fit fails alone, and every other error is left to the caller."""

from __future__ import annotations

import pytest
import torch

from service.engine.oom import is_oom, split_on_oom

OOM = "CUDA out of memory. Tried to allocate 1 GiB"


def fits(limit: int, calls: list | None = None, bad: set[int] = frozenset()):
    """run(lo, hi) that runs out of memory past `limit` rows or on a row in `bad`."""
    def run(lo: int, hi: int) -> list[int]:
        if hi - lo > limit or bad & set(range(lo, hi)):
            raise RuntimeError(OOM)
        if calls is not None:
            calls.append((lo, hi))
        return [2 * i for i in range(lo, hi)]
    return run


def test_a_batch_that_fits_runs_once():
    calls = []
    assert split_on_oom(fits(8, calls), 0, 8) == [(0, 8, list(range(0, 16, 2)))]
    assert calls == [(0, 8)]


def test_halves_until_each_piece_fits_covering_the_range_in_order():
    calls, splits = [], []
    pieces = split_on_oom(fits(2, calls), 3, 10, on_split=lambda lo, hi: splits.append((lo, hi)))
    assert [(lo, hi) for lo, hi, _ in pieces] == calls == [(3, 4), (4, 6), (6, 8), (8, 10)]
    assert [x for _, _, r in pieces for x in r] == [2 * i for i in range(3, 10)]
    assert splits == [(3, 10), (3, 6), (6, 10)]


def test_one_image_that_never_fits_fails_alone():
    pieces = split_on_oom(fits(4, bad={5}), 0, 8, on_single=lambda e: ValueError(str(e)))
    errors = [(lo, hi) for lo, hi, r in pieces if isinstance(r, BaseException)]
    assert errors == [(5, 6)]
    assert isinstance(pieces[[lo for lo, _, _ in pieces].index(5)][2], ValueError)
    ok = [x for _, _, r in pieces if not isinstance(r, BaseException) for x in r]
    assert ok == [2 * i for i in range(8) if i != 5]
    # without on_single, the row's piece holds the error itself
    (piece,) = split_on_oom(fits(0), 2, 3)
    assert piece[:2] == (2, 3) and is_oom(piece[2])


def test_other_errors_propagate_without_splitting():
    splits = []

    def run(lo, hi):
        raise ValueError("a bug, not memory")

    with pytest.raises(ValueError):
        split_on_oom(run, 0, 8, on_split=lambda lo, hi: splits.append((lo, hi)))
    assert splits == []


def test_what_counts_as_out_of_memory():
    assert is_oom(RuntimeError(OOM))
    assert is_oom(torch.OutOfMemoryError("CUDA out of memory"))
    assert not is_oom(RuntimeError("shape mismatch"))
    assert not is_oom(ValueError("out of memory"))  # only torch's RuntimeError family
