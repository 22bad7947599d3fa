"""The PNG writer and the tiler: what PIL (and so every browser) reads back is what we wrote."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from models.images import png_bytes, tile, to_uint8


@pytest.mark.parametrize("shape", [(28, 28, 1), (7, 13, 3), (5, 9, 4), (1, 1, 1), (64, 80, 3)])
def test_png_bytes_round_trip_through_pil(shape):
    a = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    data = png_bytes(a)
    Image.open(io.BytesIO(data)).verify()  # chunk CRCs and structure
    im = Image.open(io.BytesIO(data))
    assert im.format == "PNG" and im.size == (shape[1], shape[0])
    assert im.mode == {1: "L", 3: "RGB", 4: "RGBA"}[shape[2]]
    back = np.asarray(im)
    assert np.array_equal(back.reshape(shape), a)


def test_png_bytes_refuses_what_it_cannot_write():
    with pytest.raises(ValueError):
        png_bytes(np.zeros((4, 4, 2), dtype=np.uint8))
    with pytest.raises(ValueError):
        png_bytes(np.zeros((4, 4, 1), dtype=np.float32))


def test_a_tiled_grid_is_one_readable_png():
    x = to_uint8(torch.rand(5, 1, 28, 28))
    grid = tile(x, pad=2)
    assert grid.shape == (2 * 30 - 2, 3 * 30 - 2, 1)  # 3 columns, 2 rows, 2 px apart
    back = np.asarray(Image.open(io.BytesIO(png_bytes(grid))))
    assert np.array_equal(back[:28, :28], x[0, ..., 0])
    assert np.array_equal(back[:28, 30:58], x[1, ..., 0])
    assert np.array_equal(back[30:58, 30:58], x[4, ..., 0])
    assert not back[30:58, 60:88].any()  # the empty sixth cell stays black
