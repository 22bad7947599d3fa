"""Data loaders: IDX reader, image folders, the shipped MNIST slice and its stratified split."""

import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from training.data import DatasetError, augment, load_dataset, load_folder, load_idx, read_idx


def write_idx(path, arr: np.ndarray, gz: bool = False) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


def test_idx_reader_round_trip(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (5, 28, 28)).astype(np.uint8)
    write_idx(tmp_path / "x", arr)
    assert np.array_equal(read_idx(tmp_path / "x"), arr)
    write_idx(tmp_path / "x.gz", arr, gz=True)
    assert np.array_equal(read_idx(tmp_path / "x.gz"), arr)


def test_idx_reader_rejects_truncated(tmp_path):
    arr = np.zeros((5, 4, 4), dtype=np.uint8)
    write_idx(tmp_path / "x", arr)
    data = (tmp_path / "x").read_bytes()
    (tmp_path / "x").write_bytes(data[:-3])
    with pytest.raises(DatasetError, match="expected 80 bytes"):
        read_idx(tmp_path / "x")


def test_idx_folder_dataset(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 20), ("t10k", 6)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)), gz=True)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 3, gz=True)
    ds = load_dataset(f"idx:{tmp_path}")
    assert ds.train.images.shape == (20, 1, 28, 28) and len(ds.test) == 6
    assert ds.classes == ["0", "1", "2"]
    assert ds.train.labels.tolist()[:4] == [0, 1, 2, 0]


def test_idx_folder_missing_file(tmp_path):
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte"):
        load_idx(tmp_path, "idx")


def test_folder_loader(tmp_path):
    for cls, value in (("cats", 10), ("dogs", 200)):
        (tmp_path / cls).mkdir()
        for i in range(10):
            Image.new("RGB", (20, 12), (value, value, i)).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "cats" / "notes.txt").write_text("not an image")
    ds = load_folder(tmp_path, image_size=(8, 8))
    assert ds.classes == ["cats", "dogs"]
    assert ds.channels == 3 and ds.image_size == (8, 8)
    assert len(ds.train) + len(ds.test) == 20
    assert sorted(ds.test.labels.tolist()) == [0, 1]  # stratified: one of each class held out
    cats = ds.train.images[ds.train.labels == 0]
    assert int(cats[:, 0].float().mean().round()) == 10


def test_unknown_and_missing_datasets(tmp_path):
    with pytest.raises(DatasetError, match="unknown data set"):
        load_dataset("cifar")
    with pytest.raises(DatasetError, match="not found"):
        load_dataset(f"folder:{tmp_path / 'nope'}")


def test_mnist_split_is_stratified_and_disjoint():
    ds = load_dataset("mnist")
    assert len(ds.train) == 4500 and len(ds.test) == 500
    counts = np.bincount(ds.test.labels.numpy(), minlength=10)
    total = np.bincount(np.concatenate([ds.train.labels.numpy(), ds.test.labels.numpy()]), minlength=10)
    assert np.all(np.abs(counts - total * 0.1) <= 1)
    train = {bytes(x.numpy()) for x in ds.train.images}
    assert not any(bytes(x.numpy()) in train for x in ds.test.images)


def test_fashion_mnist_standard_split():
    ds = load_dataset("fashion-mnist")
    assert len(ds.train) == 60000 and len(ds.test) == 10000
    assert ds.classes[0] == "T-shirt/top" and len(ds.classes) == 10


def test_augment_keeps_digits_recognisable_and_is_seeded():
    d = load_dataset("mnist")
    x = d.train.images[:50]
    a = augment(x, 3, seed=1)
    assert a.shape == (150, 1, 28, 28) and a.dtype == torch.uint8
    assert torch.equal(a, augment(x, 3, seed=1)) and not torch.equal(a, augment(x, 3, seed=2))
    assert augment(x, 0).shape == (0, 1, 28, 28)
    # row j*N + i is a copy of image i: a small turn/zoom/shift, so it stays close to it
    # (mostly closer to it than to any other image of the slice) and keeps about the same ink
    ink = x.float().flatten(1)
    copy = a[100:150].float().flatten(1)
    dist = torch.cdist(copy, ink)
    assert (dist.argmin(1) == torch.arange(50)).float().mean() >= 0.75
    assert abs(copy.mean() - ink.mean()) / ink.mean() < 0.1
    assert not torch.equal(a[:50], x)
