"""Judging scene models without a pretrained network: the sliced Wasserstein distance (SWD)
between the local patches of two image sets, level by level of a Laplacian pyramid
(Karras et al. 2018, "Progressive growing of GANs", section 5).

Each level's 7x7 patches become descriptors, normalised per channel within their own set;
the distance is the mean over random unit directions of the 1-D Wasserstein distance between
the sets' projections (sorted, compared rank by rank). Reported x1000, as in the paper, per
level (finest first) and averaged. A figure means little alone, so every report carries its
floor (held-out crops against other held-out crops of the same photographs) and a blur
baseline (those crops blurred) beside it. Crops of the training photographs are judged the
same way: the distance that the split by photograph alone puts between the data a model learns
from and the held-out crops, which samples of even a perfect model of that data would show.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from models.checkpoint import load_bundle
from models.sampling import SAMPLING_DEFAULTS

from .common import pick_device
from .data import load_dataset
from .evaluation import publish

PATCH = 7
_BINOMIAL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16


def _blur(x: torch.Tensor) -> torch.Tensor:
    """The 5-tap binomial filter of a Gaussian pyramid, per channel, reflect-padded."""
    c = x.shape[1]
    k = (_BINOMIAL[:, None] * _BINOMIAL[None, :]).to(x)[None, None].repeat(c, 1, 1, 1)
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), k, groups=c)


def laplacian_pyramid(x: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """Band-pass levels, finest first; the last level is the remaining low-pass image."""
    out = []
    for _ in range(levels - 1):
        low = _blur(x)[:, :, ::2, ::2]
        up = F.interpolate(low, size=x.shape[2:], mode="bilinear", align_corners=False)
        out.append(x - up)
        x = low
    out.append(x)
    return out


def _descriptors(level: torch.Tensor, per_image: int, g: torch.Generator) -> torch.Tensor:
    """`per_image` random 7x7 patches of every image, flattened, normalised per channel."""
    n, c, h, w = level.shape
    ys = torch.randint(0, h - PATCH + 1, (n, per_image), generator=g)
    xs = torch.randint(0, w - PATCH + 1, (n, per_image), generator=g)
    off = torch.arange(PATCH)
    rows = (ys[..., None] + off)[..., :, None].expand(n, per_image, PATCH, PATCH)
    cols = (xs[..., None] + off)[..., None, :].expand(n, per_image, PATCH, PATCH)
    img = torch.arange(n)[:, None, None, None].expand_as(rows)
    patches = level.permute(0, 2, 3, 1)[img, rows, cols]  # (n, per_image, 7, 7, c)
    d = patches.reshape(-1, PATCH * PATCH, c)
    d = (d - d.mean((0, 1))) / (d.std((0, 1)) + 1e-8)
    return d.reshape(len(d), -1)


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, directions: int = 512, repeats: int = 4,
                       g: torch.Generator | None = None) -> float:
    """Mean 1-D Wasserstein distance of the projections of two equal-sized descriptor sets."""
    total = 0.0
    for _ in range(repeats):
        d = torch.randn(a.shape[1], directions, generator=g)
        d /= d.norm(dim=0, keepdim=True)
        pa, _ = torch.sort(a @ d, dim=0)
        pb, _ = torch.sort(b @ d, dim=0)
        total += float((pa - pb).abs().mean())
    return total / repeats


def swd(x: torch.Tensor, y: torch.Tensor, seed: int = 0, per_image: int = 64) -> dict:
    """SWD x1000 between two sets of images (uint8 or [0, 1] floats, same count and size):
    one figure per pyramid level down to 16 pixels, finest first, and their mean."""
    if x.shape != y.shape:
        raise ValueError(f"image sets differ in shape: {tuple(x.shape)} and {tuple(y.shape)}")
    x, y = (t.float() / 255 if t.dtype == torch.uint8 else t.float() for t in (x, y))
    levels = max(1, int(torch.log2(torch.tensor(min(x.shape[2:]) / 16.0)).item()) + 1)
    g = torch.Generator().manual_seed(seed)
    per_level = []
    for lx, ly in zip(laplacian_pyramid(x, levels), laplacian_pyramid(y, levels), strict=True):
        a, b = _descriptors(lx, per_image, g), _descriptors(ly, per_image, g)
        per_level.append(round(1000 * sliced_wasserstein(a, b, g=g), 2))
    return {"levels": per_level, "mean": round(sum(per_level) / len(per_level), 2)}


def blurred(images: torch.Tensor, factor: int = 4, mode: str = "bilinear") -> torch.Tensor:
    """The blur baseline: each image shrunk `factor` times and blown up again (uint8)."""
    x = images.float()
    small = F.interpolate(x, scale_factor=1 / factor, mode="area")
    up = F.interpolate(small, size=x.shape[2:], mode=mode, align_corners=False)
    return up.round().clamp(0, 255).to(torch.uint8)


def psnr_db(x: torch.Tensor, y: torch.Tensor) -> float:
    mse = float(((x.float() - y.float()) / 255).pow(2).mean())
    return round(10 * math.log10(1 / max(mse, 1e-12)), 3)


@torch.no_grad()
def _reconstruct(vqvae, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    dev = next(vqvae.parameters()).device
    out = [vqvae(images[i: i + batch].to(dev).float() / 255)[0].clamp(0, 1).mul(255).round()
           .to(torch.uint8).cpu() for i in range(0, len(images), batch)]
    return torch.cat(out)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a checkpoint trained on photo crops")
    p.add_argument("--images", type=int, default=512, help="crops in each set")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-write", action="store_true", help="print only; leave config.json alone")
    p.add_argument("--key", default="scenes", help="name of the result inside evaluation")
    p.add_argument("--class-images", type=int, default=64,
                   help="nature: crops in each set of a class's judgement")
    p.add_argument("--cfg-scale", type=float, default=None, help="override the shipped guidance")


def evaluate(args: argparse.Namespace) -> dict:
    """SWD of reconstructions and of samples against held-out crops, beside the floor and the
    blur baseline; the tokenizer's PSNR and code usage on the same crops."""
    from .generator import sample_images
    from .vqvae import measure

    folder = Path(args.checkpoint)
    device = pick_device(args.device)
    bundle = load_bundle(folder, device=device)
    if bundle.config.get("dataset") == "nature":
        return publish(evaluate_scales(bundle, args, device), folder, args.key, not args.no_write)
    size = bundle.vqvae.config.image_size
    data = load_dataset(bundle.config["dataset"], size, crops=args.images, seed=args.seed)
    held_out = data.test.images  # fixed-seed crops of the held-out photographs
    if not data.streamed or len(held_out) < 2 * args.images:
        raise SystemExit(f"{folder}: needs a photo data set with {2 * args.images} held-out crops")
    ref, other = held_out[: args.images], held_out[args.images: 2 * args.images]
    recon = _reconstruct(bundle.vqvae, other)
    result = {
        "crop": list(size), "images": args.images, "metric": "swd_x1000_laplacian_7x7",
        "swd_floor": swd(other, ref, args.seed),
        "swd_blur": swd(blurred(other), ref, args.seed),
        "swd_training_crops": swd(data.train.images[torch.arange(args.images)], ref, args.seed),
        "swd_reconstructions": swd(recon, ref, args.seed),
        "tokenizer": {k: v for k, v in measure(bundle.vqvae, held_out).items() if k != "images"},
    }
    if bundle.gpt is not None:
        settings = dict(bundle.config.get("sampling_defaults") or SAMPLING_DEFAULTS)
        t0 = time.time()
        samples, _ = sample_images(bundle, bundle.gpt, [None] * args.images, args.seed, 128, **settings)
        result["sampling_seconds"] = round(time.time() - t0, 1)
        result["settings"] = settings
        result["swd_samples"] = swd(samples, ref, args.seed)
    floor = result["swd_floor"]["mean"]
    for key in ("blur", "training_crops", "reconstructions", "samples"):
        if f"swd_{key}" in result:
            result[f"ratio_{key}"] = round(result[f"swd_{key}"]["mean"] / max(floor, 1e-9), 2)
    result["device"] = str(device)
    return publish(result, folder, args.key, not args.no_write)


SCALES = (0.25, 0.5, 1.0)  # crop side as a fraction of the photograph's short side


def _fixed_crops(photos_: list[torch.Tensor], labels: list[int], size: int, n: int, seed: int,
                 frac: float) -> torch.Tensor:
    """n crops spanning `frac` of the short side, every photograph as often, resized to size."""
    from .photos import PhotoCrops

    crops = PhotoCrops(photos_, size, n, seed, span=(frac, frac), photo_labels=labels, by_area=False)
    return crops[torch.arange(n)]


def _judge(sets: dict[str, torch.Tensor], ref: torch.Tensor, seed: int) -> dict:
    """SWD of every set against `ref`, and each one's ratio to the first (the floor)."""
    out = {name: swd(x, ref, seed) for name, x in sets.items()}
    floor = max(next(iter(out.values()))["mean"], 1e-9)
    res = {f"swd_{k}": v["mean"] for k, v in out.items()}
    res.update({f"levels_{k}": v["levels"] for k, v in out.items()})
    res.update({f"ratio_{k}": round(v["mean"] / floor, 2) for k, v in out.items()})
    if "samples" in out:
        res["samples_vs_training_crops"] = round(out["samples"]["mean"] /
                                                 max(out["training_crops"]["mean"], 1e-9), 2)
    if "reconstructions" in out:
        res["reconstructions_vs_blur"] = round(out["reconstructions"]["mean"] /
                                               max(out["blur"]["mean"], 1e-9), 2)
    return res


def evaluate_scales(bundle, args: argparse.Namespace, device) -> dict:
    """The nature model judged as its issue asks: at crops spanning 1/4, 1/2 and the whole
    short side of the held-out photographs, over all of them and class by class (classes with
    at least 3 held-out photographs): the floor (other held-out crops), the 2x bicubic blur,
    the training photographs' crops, the tokenizer's reconstructions (with PSNR) and samples
    (unconditional over all; conditioned on the class, with the shipped guidance, per class)."""
    from .data import nature_photos
    from .generator import sample_images
    from .vqvae import measure

    size = bundle.vqvae.config.image_size[0]
    n, seed = args.images, args.seed
    test_photos, test_labels, classes = nature_photos("test")
    train_photos, train_labels, _ = nature_photos("train")
    settings = dict(bundle.config.get("sampling_defaults") or SAMPLING_DEFAULTS)
    if args.cfg_scale is not None:
        settings["cfg_scale"] = args.cfg_scale
    gpt = bundle.gpt
    result: dict = {"crop": [size, size], "images": n, "class_images": args.class_images,
                    "metric": "swd_x1000_laplacian_7x7", "scales": {}, "classes": {},
                    "blur": "2x down (area), up (bicubic)", "settings": settings}
    samples = None
    if gpt is not None:
        t0 = time.time()
        samples, _ = sample_images(bundle, gpt, [None] * n, seed, 128, **settings)
        result["sampling_seconds"] = round(time.time() - t0, 1)
    all_held = []
    for frac in SCALES:
        held = _fixed_crops(test_photos, test_labels, size, 2 * n, seed + 1, frac)
        ref, other = held[:n], held[n:]
        all_held.append(held)
        recon = _reconstruct(bundle.vqvae, other)
        sets = {"floor": other, "blur": blurred(other, 2, "bicubic"),
                "training_crops": _fixed_crops(train_photos, train_labels, size, n, seed, frac),
                "reconstructions": recon}
        if samples is not None:
            sets["samples"] = samples
        res = _judge(sets, ref, seed)
        res["psnr_reconstructions_db"] = psnr_db(recon, other)
        res["psnr_blur_db"] = psnr_db(sets["blur"], other)
        result["scales"][str(frac)] = res
    result["tokenizer"] = {k: v for k, v in measure(bundle.vqvae, torch.cat(all_held)).items()
                           if k != "images"}
    m = args.class_images
    for c, name in enumerate(classes):
        held_c = [p for p, lab in zip(test_photos, test_labels, strict=True) if lab == c]
        if len(held_c) < 3:
            result["classes"][name] = {"held_out_photographs": len(held_c), "judged": False}
            continue
        train_c = [p for p, lab in zip(train_photos, train_labels, strict=True) if lab == c]
        cls_samples = None
        if gpt is not None and gpt.config.n_classes:
            cls_samples, _ = sample_images(bundle, gpt, [c] * m, seed + 7 + c, 128, **settings)
        per = {"held_out_photographs": len(held_c), "training_photographs": len(train_c),
               "judged": True}
        for frac in SCALES:
            held = _fixed_crops(held_c, [c] * len(held_c), size, 2 * m, seed + 1, frac)
            sets = {"floor": held[m:],
                    "training_crops": _fixed_crops(train_c, [c] * len(train_c), size, m, seed, frac)}
            if cls_samples is not None:
                sets["samples"] = cls_samples
            per[str(frac)] = _judge(sets, held[:m], seed)
        result["classes"][name] = per
    result["device"] = str(device)
    return result
