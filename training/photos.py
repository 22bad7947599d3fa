"""Scenes from large photographs: random crops at several scales, drawn as they are asked for.

A folder of photographs becomes a data set whose training split is an endless supply of
square crops: each crop takes a random photograph, a random side between 1x and `max_scale`x
the crop size (in the photograph's stored pixels), a random place and a random horizontal
flip, and is resized to the crop size. Only the photographs stay in memory (shrunk once so
their shorter side is `stored_side`), never the crops. The split is by photograph: held-out
photographs give the test crops (a fixed seed, so every evaluation sees the same ones) and
never a training crop.

Specs: `landscapes` (the nature photographs listed in training/landscapes.txt, from Debian's
wallpaper packages; `make data` installs them), `nature` (the photographs of
training/nature.csv with their scene classes, extracted into data/nature by `make photos`; its
crops span a fraction of each photograph's short side, up to all of it, so that they hold a
composition and not only a texture) and `crops:DIR` (any folder of photographs, searched
recursively; every tenth photograph in name order is held out).
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

LANDSCAPES_LIST = Path(__file__).with_name("landscapes.txt")
NATURE_LIST = Path(__file__).with_name("nature.csv")
NATURE_DIR = Path(__file__).resolve().parents[1] / "data" / "nature"
NATURE_STORED_SIDE = 768
NATURE_SPAN = (1 / 6, 1.0)  # crop side as a fraction of the photograph's short side
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
                 max_scale: float = MAX_SCALE, flip: bool = True,
                 span: tuple[float, float] | None = None, photo_labels: list[int] | None = None,
                 by_area: bool = True) -> None:
        """`span` (lo, hi): the crop's side is that fraction of each photograph's short side
        (log-uniform), instead of 1x to `max_scale`x the crop size; `photo_labels`: each
        photograph's class, which its crops take as their label (default: its index);
        `by_area`: larger photographs give more crops (else every photograph as many)."""
        if not photos:
            raise ValueError("no photographs")
        if photo_labels is not None and len(photo_labels) != len(photos):
            raise ValueError(f"{len(photo_labels)} labels for {len(photos)} photographs")
        if span is not None and not 0 < span[0] <= span[1] <= 1:
            raise ValueError(f"span {span}: fractions of the short side, 0 < lo <= hi <= 1")
        self.photos, self.size, self.length = photos, int(size), int(length)
        self.seed, self.max_scale, self.flip, self.span = seed, max_scale, flip, span
        short = min(min(p.shape[1:]) for p in photos)
        if short < size and span is None:
            raise ValueError(f"a photograph of {short} px is smaller than the {size}-px crop")
        self.max_scale = min(max_scale, short / size)
        # larger photographs give proportionally more crops
        area = torch.tensor([p.shape[1] * p.shape[2] if by_area else 1 for p in photos],
                            dtype=torch.float64)
        self._cum = torch.cumsum(area / area.sum(), 0)
        index = [self._params(i)[0] for i in range(self.length)]
        self.labels = torch.tensor(index if photo_labels is None else [photo_labels[j] for j in index],
                                   dtype=torch.int64)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.length, self.photos[0].shape[0], self.size, self.size)

    def __len__(self) -> int:
        return self.length

    def _params(self, i: int) -> tuple[int, float, float, float, bool]:
        u = np.random.default_rng((self.seed, i)).random(5)
        photo = min(int(torch.searchsorted(self._cum, torch.tensor(u[0], dtype=torch.float64))),
                    len(self.photos) - 1)
        if self.span is None:
            scale = math.exp(u[1] * math.log(self.max_scale))  # log-uniform in [1, max_scale]
        else:  # a fraction of the short side, log-uniform in the span
            lo, hi = self.span
            scale = math.exp(math.log(lo) + u[1] * math.log(hi / lo))
        return photo, scale, u[2], u[3], bool(u[4] < 0.5) and self.flip

    def crop(self, i: int) -> torch.Tensor:
        photo, scale, fy, fx, flip = self._params(i)
        img = self.photos[photo]
        base = self.size if self.span is None else min(img.shape[1:])
        side = max(1, min(round(base * scale), *img.shape[1:]))
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


@dataclass(frozen=True)
class NaturePhoto:
    """One row of training/nature.csv: where the photograph comes from and what it shows."""
    split: str
    scene: str
    package: str
    path: str  # the file installed by the package (for gcompris-qt-data: its .rcc)
    member: str  # the file inside the .rcc, else empty
    licence: str
    author: str

    @property
    def local(self) -> Path:
        """Where `make photos` puts it: data/nature/PACKAGE/[RCC/]NAME."""
        if self.member:
            return NATURE_DIR / self.package / Path(self.path).stem / Path(self.member).name
        return NATURE_DIR / self.package / (photo_name(Path(self.path)) + Path(self.path).suffix.lower())


def nature_list(path: Path = NATURE_LIST) -> list[NaturePhoto]:
    with open(path, newline="") as f:
        rows = [NaturePhoto(**row) for row in csv.DictReader(f)]
    bad = [r for r in rows if r.split not in ("train", "test")]
    if bad:
        raise ValueError(f"{path}: split must be train or test, got {bad[0].split!r}")
    return rows


def nature_classes(rows: list[NaturePhoto]) -> list[str]:
    """The scene classes in a fixed order: as they first appear in the list."""
    return list(dict.fromkeys(r.scene for r in rows))


def extract_nature(rows: list[NaturePhoto] | None = None, force: bool = False) -> int:
    """Copy every listed photograph into data/nature (reading .rcc members); returns how many
    were written. Missing package files raise FileNotFoundError naming the package."""
    import shutil

    from .rcc import RccFile

    rccs: dict[str, RccFile] = {}
    written = 0
    for row in rows if rows is not None else nature_list():
        if row.local.is_file() and not force:
            continue
        if not Path(row.path).is_file():
            raise FileNotFoundError(f"{row.path} missing: apt-get install {row.package}")
        row.local.parent.mkdir(parents=True, exist_ok=True)
        if row.member:
            rcc = rccs.setdefault(row.path, RccFile.open(row.path))
            row.local.write_bytes(rcc.read(row.member))
        else:
            shutil.copyfile(row.path, row.local)
        written += 1
    return written
