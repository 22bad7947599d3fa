"""Benchmark: what inpainting costs at the seams, landscapes model, held-out photo crops.

Each crop is encoded, a region of its cells is sampled again with the rest kept (what
/generate does with `image` and `mask`), and the result is compared with the crop's plain
reconstruction (the decode of all its own tokens), in three orders:

- `raster`: the sampler's own order (a masked cell sees the kept cells above it and to its
  left within the window, never those below or to its right);
- `flipped`: the same pass on the mirrored crop (the model was trained with horizontal
  flips), mirrored back: a masked cell then sees the kept cells to its right instead;
- `auto`: per mask, whichever of the two leaves more kept cells visible to the masked ones.

Two measures, each beside the reconstructions' own figure:
1. seam ratio: the mean absolute pixel step across the mask's border (pairs of pixels on
   either side of a cell edge between a kept and a sampled cell), over the mean step of the
   parallel pairs one pixel to either side; a border that is no seam scores about 1. Given
   per side of the region (top, bottom, left, right border of the sampled cells).
2. SWD x1000 (training/scenes.py: Laplacian-pyramid 7x7 patches) of the edited crops
   against the reconstructions, whole crops.

    python bench/seams.py [--crops 64] [--seed 0] [--out FILE]

Prints JSON and writes bench/results/seams.json (or --out). Not a test.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from models.checkpoint import load_bundle  # noqa: E402
from models.sampling import FREE, make_batch  # noqa: E402
from models.slots import sample  # noqa: E402
from training.data import load_dataset  # noqa: E402
from training.scenes import swd  # noqa: E402

SIDES = ("top", "bottom", "left", "right")


def masks(grid: tuple[int, int]) -> dict[str, np.ndarray]:
    """Regions to repaint (true: sample), each a quarter to a third of the crop. A right band
    is the left band mirrored (what `flipped` samples for it), a top band has nothing below
    it to miss."""
    h, w = grid
    out = {}
    for name, rows, cols in (
            ("centre hole", slice(h // 4, 3 * h // 4), slice(w // 4, 3 * w // 4)),
            ("left band", slice(None), slice(0, w // 3)),
            ("bottom band", slice(h - h // 3, None), slice(None))):
        m = np.zeros(grid, dtype=bool)
        m[rows, cols] = True
        out[name] = m
    return out


def visible_kept(mask: np.ndarray, window: tuple[int, int]) -> int:
    """Kept cells the masked ones see in raster order, summed: those of the window's rows
    above (half the window's width either side) and those to the left in the same row."""
    wr, wc = window
    h, w = mask.shape
    kept = ~mask
    total = 0
    for r, c in zip(*np.nonzero(mask), strict=True):
        above = kept[max(0, r - wr + 1): r, max(0, c - wc // 2): c + wc // 2 + 1].sum()
        left = kept[r, max(0, c - wc // 2): c].sum()
        total += int(above + left)
    return total


@torch.no_grad()
def inpaint(bundle, images: torch.Tensor, mask: np.ndarray, seed: int) -> torch.Tensor:
    """uint8 (N, H, W, C) crops -> the crops with `mask`'s cells sampled again (uint8)."""
    gpt, vq = bundle.gpt.eval(), bundle.vqvae.eval()
    tokens = vq.encode_pixels(images)
    grid = tuple(tokens.shape[1:])
    rows = []
    for i, t in enumerate(tokens):
        cells = torch.where(torch.from_numpy(mask).reshape(-1), FREE, t.reshape(-1))
        rows.append(make_batch(gpt.config, 1, grid, cells=cells,
                               generator=torch.Generator().manual_seed(seed + i)))
    batch = type(rows[0]).cat(rows)
    codes = torch.cat([sample(gpt, batch.rows(lo, lo + 16), grid)
                       for lo in range(0, len(batch), 16)])
    return vq.decode_pixels(codes.view(-1, *grid))


def seam_steps(x: torch.Tensor, mask: np.ndarray, f: int
               ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per side, per crop: (mean step across the border, mean step of the parallel pairs
    beside it), each (N,)."""
    a = x.float().mean(-1)  # (N, H, W): steps of the luma
    h, w = mask.shape
    out = {}
    for side in SIDES:
        across, beside = [], []
        for r in range(h):
            for c in range(w):
                if not mask[r, c]:
                    continue
                if side == "top" and r > 0 and not mask[r - 1, c]:
                    y, cols = r * f, slice(c * f, (c + 1) * f)
                    across.append((a[:, y, cols] - a[:, y - 1, cols]).abs())
                    beside += [(a[:, y + 1, cols] - a[:, y, cols]).abs(),
                               (a[:, y - 1, cols] - a[:, y - 2, cols]).abs()]
                if side == "bottom" and r < h - 1 and not mask[r + 1, c]:
                    y, cols = (r + 1) * f, slice(c * f, (c + 1) * f)
                    across.append((a[:, y, cols] - a[:, y - 1, cols]).abs())
                    beside += [(a[:, y + 1, cols] - a[:, y, cols]).abs(),
                               (a[:, y - 1, cols] - a[:, y - 2, cols]).abs()]
                if side == "left" and c > 0 and not mask[r, c - 1]:
                    xx, rows = c * f, slice(r * f, (r + 1) * f)
                    across.append((a[:, rows, xx] - a[:, rows, xx - 1]).abs())
                    beside += [(a[:, rows, xx + 1] - a[:, rows, xx]).abs(),
                               (a[:, rows, xx - 1] - a[:, rows, xx - 2]).abs()]
                if side == "right" and c < w - 1 and not mask[r, c + 1]:
                    xx, rows = (c + 1) * f, slice(r * f, (r + 1) * f)
                    across.append((a[:, rows, xx] - a[:, rows, xx - 1]).abs())
                    beside += [(a[:, rows, xx + 1] - a[:, rows, xx]).abs(),
                               (a[:, rows, xx - 1] - a[:, rows, xx - 2]).abs()]
        if across:
            out[side] = (torch.cat(across, 1).mean(1), torch.cat(beside, 1).mean(1))
    return out


def seam_ratio(x: torch.Tensor, mask: np.ndarray, f: int) -> dict[str, float]:
    """Per side (pooled over crops), and over every side: the mean of the crops' ratios
    and its standard error."""
    steps = seam_steps(x, mask, f)
    ratios = {side: round(float(a.mean() / b.mean().clamp(min=1e-9)), 3)
              for side, (a, b) in steps.items()}
    a = sum(s[0] for s in steps.values()) / len(steps)
    b = sum(s[1] for s in steps.values()) / len(steps)
    per_crop = a / b.clamp(min=1e-9)
    se = float(per_crop.std() / len(per_crop) ** 0.5) if len(per_crop) > 1 else 0.0
    return {**ratios, "all": round(float(per_crop.mean()), 3), "all_se": round(se, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--crops", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "seams.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    bundle = load_bundle(ROOT / "checkpoints" / "landscapes", require_gpt=True)
    vq, cfg = bundle.vqvae.eval(), bundle.gpt.config
    size = vq.config.image_size
    f = size[0] // cfg.grid[0]
    data = load_dataset("landscapes", size, crops=args.crops, seed=args.seed)
    crops = data.test.images[: args.crops].permute(0, 2, 3, 1).contiguous()  # (N, H, W, C)
    t0 = time.time()
    with torch.no_grad():
        recon = vq.decode_pixels(vq.encode_pixels(crops))
        recon_flipped = vq.decode_pixels(vq.encode_pixels(crops.flip(2))).flip(2)

    def nchw(x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2).contiguous()

    results = {}
    for name, mask in masks(cfg.grid).items():
        raster = inpaint(bundle, crops, mask, args.seed)
        flipped = inpaint(bundle, crops.flip(2), mask[:, ::-1].copy(), args.seed).flip(2)
        seen = {"raster": visible_kept(mask, cfg.window),
                "flipped": visible_kept(mask[:, ::-1], cfg.window)}
        auto = "flipped" if seen["flipped"] > seen["raster"] else "raster"
        row = {"cells": int(mask.sum()), "kept_cells_visible": seen, "auto_picks": auto,
               "seam_ratio": {"reconstruction": seam_ratio(recon, mask, f),
                              "raster": seam_ratio(raster, mask, f),
                              "flipped": seam_ratio(flipped, mask, f)},
               "swd_vs_reconstruction": {
                   "raster": swd(nchw(raster), nchw(recon), args.seed)["mean"],
                   "flipped": swd(nchw(flipped), nchw(recon_flipped), args.seed)["mean"],
                   "reconstruction_flipped": swd(nchw(recon_flipped), nchw(recon),
                                                 args.seed)["mean"]}}
        row["seam_ratio"]["auto"] = row["seam_ratio"][auto]
        row["swd_vs_reconstruction"]["auto"] = row["swd_vs_reconstruction"][auto]
        results[name] = row
        print(name, json.dumps(row), flush=True)
    mean = {order: round(float(np.mean([r["seam_ratio"][order]["all"] for r in results.values()])), 3)
            for order in ("reconstruction", "raster", "flipped", "auto")}
    out = {"bench": "seams", "model": "landscapes", "crops": args.crops, "seed": args.seed,
           "crop": list(size), "grid": list(cfg.grid), "window": list(cfg.window),
           "masks": results, "mean_seam_ratio": mean, "seconds": round(time.time() - t0, 1),
           "machine": platform.processor() or platform.machine(), "threads": args.threads,
           "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps({"mean_seam_ratio": mean, "seconds": out["seconds"]}))


if __name__ == "__main__":
    main()
