"""The nature data set: its list (what the issue asks of it, checked on the committed file),
and crops that span a fraction of each photograph's short side and carry its scene class."""

from __future__ import annotations

import collections

import pytest
import torch

from training import photos
from training.data import DatasetError, load_nature


def test_the_list_holds_enough_real_photographs_split_by_class():
    rows = photos.nature_list()
    assert len(rows) >= 150
    assert len({(r.path, r.member) for r in rows}) == len(rows)  # no photograph twice
    assert len({r.local for r in rows}) == len(rows)  # nor two on one extracted file
    assert not {r.package for r in rows} & {"enlightenment-data", "jigzo-data"}
    assert all(r.licence.strip() for r in rows)
    classes = photos.nature_classes(rows)
    assert 4 <= len(classes) <= 8
    held = collections.Counter(r.scene for r in rows if r.split == "test")
    assert sum(held.values()) >= 15
    assert set(held) == set(classes)  # every class has held-out photographs
    # rcc members name the file inside the package's resource file
    assert all(r.path.endswith(".rcc") == bool(r.member) for r in rows)


def _photo(h: int, w: int, value: int) -> torch.Tensor:
    return torch.full((3, h, w), value, dtype=torch.uint8)


def test_crops_span_the_short_side_and_take_the_photographs_class():
    # a photograph whose left and right halves differ: a whole-side crop of a 100x300
    # photograph holds one half only if it is narrower than the short side
    left_right = torch.cat([_photo(100, 150, 0), _photo(100, 150, 255)], dim=2)
    crops = photos.PhotoCrops([left_right, _photo(200, 200, 9)], 32, 200, seed=1,
                              span=(1.0, 1.0), photo_labels=[4, 7], by_area=False)
    assert set(crops.labels.tolist()) == {4, 7}
    counts = collections.Counter(crops.labels.tolist())
    assert abs(counts[4] - counts[7]) < 60  # every photograph as many crops, not by area
    for i in range(40):
        c = crops[i]
        assert c.shape == (3, 32, 32)
        if int(crops.labels[i]) == 7:
            assert torch.all(c == 9)
    # a whole-side crop of the 100x300 photograph is 100 px wide: over the seam it mixes both
    # halves; some such crop must do so (a 32-px crop-size one could not span 100 px)
    mixed = [crops[i] for i in range(200) if int(crops.labels[i]) == 4]
    assert any(c.float().std() > 50 for c in mixed)
    with pytest.raises(ValueError, match="span"):
        photos.PhotoCrops([left_right], 32, 4, span=(0.0, 1.0))
    with pytest.raises(ValueError, match="labels"):
        photos.PhotoCrops([left_right], 32, 4, photo_labels=[1, 2])


def test_a_missing_photograph_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(photos, "NATURE_DIR", tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="make photos"):
        load_nature(32, 8)
    bad = tmp_path / "bad.csv"
    bad.write_text("split,scene\nvalidation,sky\n")
    with pytest.raises(DatasetError, match="bad.csv"):
        load_nature(32, 8, list_path=bad)
