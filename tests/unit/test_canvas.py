"""The cached canvas sampler (models/canvas.py) against its uncached reference: the same
codes whatever the wavefront's width, with every sampling setting, on canvases of any shape."""

from __future__ import annotations

import pytest
import torch
from model_helpers import gen, tiny

from models.canvas import CanvasSampler, canvas_reference, generate_canvas, lag, ring_rows
from models.sampling import SamplingBatch, make_batch

SETTINGS = [dict(label=1), dict(top_k=3), dict(label=2, top_p=0.6, temperature=0.7),
            dict(label=0, prefix=list(range(11)))]


def run(sampler: CanvasSampler, limit: int) -> tuple[int, int]:
    """Steps taken and the most cells in one step."""
    steps = widest = 0
    while not sampler.done:
        cells = sampler.plan(limit)
        assert cells, "a canvas that is not done always has a cell to run"
        widest = max(widest, len(cells))
        sampler.step(cells)
        steps += 1
    return steps, widest


FAST = {((2, 3), (5, 7)), ((1, 1), (4, 13))}  # the inner loop's cases; `make test` runs all
CASES = [pytest.param(w, g, marks=() if (w, g) in FAST else pytest.mark.slow)
         for w in [(1, 1), (2, 3), (3, 5), (3, 9)] for g in [(5, 7), (9, 6), (4, 13)]]


@pytest.mark.parametrize("window,grid", CASES)
def test_cached_canvas_equals_reference_at_every_wavefront_width(window, grid):
    m = tiny(window, grid=(3, 4), positions="relative")
    for seed, kw in enumerate(SETTINGS):
        batch = make_batch(m.config, 1, grid, generator=gen(seed), **kw)
        ref = canvas_reference(m, batch, grid)[0]
        for limit in (1, 2, grid[0]):
            s = CanvasSampler(m, batch, grid)
            run(s, limit)
            assert torch.equal(s.codes, ref), (seed, limit)
        if kw.get("prefix"):
            assert ref[:11].tolist() == kw["prefix"]


def test_wavefront_runs_a_cell_of_many_rows_per_step():
    """Rows trail each other by lag(window) columns: a wide canvas runs about W / lag rows
    at once, in W + lag * (H - 1) steps instead of one step per cell."""
    window, grid = (2, 3), (12, 20)
    m = tiny(window, grid=(3, 4), positions="relative")
    s = CanvasSampler(m, make_batch(m.config, 1, grid, generator=gen(0)), grid)
    steps, widest = run(s, grid[0])
    H, W = grid
    assert steps == W + 1 + lag(window) * (H - 1) - 1
    assert widest == -(-(W + 1) // lag(window))
    assert ring_rows(grid, window) < H  # keys of a band of rows, not of the canvas


def test_batch_of_canvases_is_each_image_alone():
    m = tiny((2, 3), grid=(3, 4), positions="relative")
    grid = (6, 8)
    rows = [make_batch(m.config, 1, grid, generator=gen(s), **SETTINGS[s]) for s in range(3)]
    out = generate_canvas(m, SamplingBatch.cat(rows), grid)
    for i, row in enumerate(rows):
        assert torch.equal(out[i], canvas_reference(m, row, grid)[0])


def test_canvas_refuses_what_it_cannot_sample():
    m = tiny((2, 3), grid=(3, 4), positions="relative")
    with pytest.raises(ValueError, match="guidance"):
        CanvasSampler(m, make_batch(m.config, 1, (6, 8), cfg_scale=2.0), (6, 8))
    absolute = tiny((2, 3), grid=(3, 4))
    with pytest.raises(ValueError, match="relative"):
        CanvasSampler(absolute, make_batch(absolute.config, 1, (6, 8)), (6, 8))
