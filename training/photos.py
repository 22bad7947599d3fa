"""Scenes from large photographs: random crops at several scales, drawn as they are asked for.

A folder of photographs becomes a data set whose training split is an endless supply of
square crops: each crop takes a random photograph, a random side between 1x and `max_scale`x
the crop size (in the photograph's stored pixels), a random place and a random horizontal
flip, and is resized to the crop size. Only the photographs stay in memory (shrunk once so
their shorter side is `stored_side`), never the crops. The split is by photograph: held-out
photographs give the test crops (a fixed seed, so every evaluation sees the same ones) and
never a training crop.

Specs: `landscapes` (the nature photographs listed in training/landscapes.txt, from Debian's
wallpaper packages; `make data` installs them) and `crops:DIR` (any folder of photographs,
searched recursively; every tenth photograph in name order is held out).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

LANDSCAPES_LIST = Path(__file__).with_name("landscapes.txt")
PHOTO_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
DEFAULT_CROP = 128
STORED_SIDE = 512  # shorter side of a photograph in memory; a crop spans 1/4 to 1/2 of it
MAX_SCALE = 2.0
TEST_CROPS = 1024


class PhotoCrops:
    """Crops of photographs, addressed like a uint8 tensor of `length` images (N, C, size, size).

    Crop i is a function of (seed, i) alone, so an index always gives the same crop and its
    label (the photograph it came from) is known without drawing it. Indexing with a slice
    gives a shorter supply (the trainers' `--limit`); with indices, a uint8 batch.
    """

    def __init__(self, photos: list[torch.Tensor], size: int, length: int, seed: int = 0,
                 max_scale: float = MAX_SCALE, flip: bool = True) -> None:
        if not photos:
            raise ValueError("no photographs")
        self.photos, self.size, self.length = photos, int(size), int(length)
        self.seed, self.max_scale, self.flip = seed, max_scale, flip
        short = min(min(p.shape[1:]) for p in photos)
        if short < size:
            raise ValueError(f"a photograph of {short} px is smaller than the {size}-px crop")
        self.max_scale = min(max_scale, short / size)
        # larger photographs give proportionally more crops
        area = torch.tensor([p.shape[1] * p.shape[2] for p in photos], dtype=torch.float64)
        self._cum = torch.cumsum(area / area.sum(), 0)
        self.labels = torch.tensor([self._params(i)[0] for i in range(self.length)], dtype=torch.int64)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.length, self.photos[0].shape[0], self.size, self.size)

    def __len__(self) -> int:
        return self.length

    def _params(self, i: int) -> tuple[int, float, float, float, bool]:
        u = np.random.default_rng((self.seed, i)).random(5)
        photo = min(int(torch.searchsorted(self._cum, torch.tensor(u[0], dtype=torch.float64))),
                    len(self.photos) - 1)
        scale = math.exp(u[1] * math.log(self.max_scale))  # log-uniform in [1, max_scale]
        return photo, scale, u[2], u[3], bool(u[4] < 0.5) and self.flip

    def crop(self, i: int) -> torch.Tensor:
        photo, scale, fy, fx, flip = self._params(i)
        img = self.photos[photo]
        side = min(round(self.size * scale), *img.shape[1:])
        y = int(fy * (img.shape[1] - side + 1))
        x = int(fx * (img.shape[2] - side + 1))
        out = img[:, y: y + side, x: x + side]
        if side != self.size:
            out = F.interpolate(out[None].float(), size=(self.size, self.size), mode="bilinear",
                                antialias=True, align_corners=False)[0].round().clamp(0, 255)
            out = out.to(torch.uint8)
        return out.flip(-1) if flip else out

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            start, stop, step = idx.indices(self.length)
            if start != 0 or step != 1:
                raise IndexError("PhotoCrops slices must start at 0 with step 1")
            view = PhotoCrops.__new__(PhotoCrops)
            view.__dict__.update(self.__dict__, length=stop, labels=self.labels[:stop])
            return view
        if isinstance(idx, int):
            return self.crop(idx)
        return torch.stack([self.crop(int(i)) for i in torch.as_tensor(idx).flatten()])


def load_photo(path: Path, stored_side: int = STORED_SIDE) -> torch.Tensor:
    """An RGB photograph as uint8 (3, H, W), shrunk so its shorter side is `stored_side`."""
    with Image.open(path) as im:
        im.draft("RGB", (stored_side * 2, stored_side * 2))  # JPEG: decode at a fraction
        im = im.convert("RGB")
        scale = stored_side / min(im.size)
        if scale < 1:
            im = im.resize((round(im.width * scale), round(im.height * scale)), Image.LANCZOS)
        return torch.from_numpy(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy())


def landscape_list(path: Path = LANDSCAPES_LIST) -> list[tuple[str, Path, str]]:
    """(split, file, package) for every line of the list: `split  path  package`."""
    rows = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            split, file, package = line.split()
            rows.append((split, Path(file), package))
    return rows


def photo_name(path: Path) -> str:
    """A photograph's name: its file's stem, or for KDE-style packages (NAME/contents/images/
    2560x1600.jpg) the package folder's name."""
    parts = [path.stem] + [p.name for p in path.parents]
    return next(p for p in parts if p and not re.fullmatch(r"\d+x\d+|images|contents", p))


def folder_photos(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in PHOTO_EXTS and p.is_file())


def split_folder(files: list[Path]) -> tuple[list[Path], list[Path]]:
    """Every tenth photograph (at least one, when there are two or more) is held out."""
    if len(files) < 2:
        return files, []
    test = files[5::10] or files[-1:]
    return [f for f in files if f not in test], test
