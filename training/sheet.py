"""A contact sheet of a model's samples: one labelled row per class (and one unconditional),
at the shipped sampling defaults, written as a small PNG for the docs."""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw

from models.checkpoint import load_bundle
from models.sampling import SAMPLING_DEFAULTS

from .common import pick_device

LABEL_WIDTH = 84


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True, help="PNG to write, e.g. docs/nature_samples.png")
    p.add_argument("--per-class", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cfg-scale", type=float, default=None, help="override the shipped guidance")
    p.add_argument("--device", default="auto")


def main(args: argparse.Namespace) -> Path:
    from .generator import sample_images

    bundle = load_bundle(args.checkpoint, device=pick_device(args.device), require_gpt=True)
    classes = list(bundle.config.get("classes") or [])
    settings = dict(bundle.config.get("sampling_defaults") or SAMPLING_DEFAULTS)
    if args.cfg_scale is not None:
        settings["cfg_scale"] = args.cfg_scale
    rows: list[tuple[str, int | None]] = [(name, i) for i, name in enumerate(classes)]
    rows.append(("no class", None))
    n = args.per_class
    labels = [lab for _, lab in rows for _ in range(n)]
    images, _ = sample_images(bundle, bundle.gpt, labels, args.seed, 64, **settings)
    h, w = images.shape[2:]
    sheet = Image.new("RGB", (LABEL_WIDTH + n * (w + 2), len(rows) * (h + 2)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (name, _) in enumerate(rows):
        draw.text((4, r * (h + 2) + h // 2 - 6), name, fill="black")
        for c in range(n):
            img = images[r * n + c]
            pil = Image.fromarray(img.permute(1, 2, 0).numpy() if img.shape[0] == 3 else img[0].numpy())
            sheet.paste(pil, (LABEL_WIDTH + c * (w + 2), r * (h + 2)))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, optimize=True)
    print(f"{out}: {len(rows)} rows of {n} samples, guidance {settings.get('cfg_scale')}")
    return out
