"""Converting between float image tensors, uint8 arrays and tiles."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) floats in [0, 1] -> (B, H, W, C) uint8 tensor (torch ops only: traceable)."""
    x = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) floats in [0, 1] -> (B, H, W, C) uint8."""
    return to_pixels(images).cpu().numpy()


def tile(images: np.ndarray, cols: int | None = None, pad: int = 2) -> np.ndarray:
    """(B, H, W, C) uint8 -> one (rows*H + pad..., C) mosaic, row-major, `pad` black pixels apart."""
    B, H, W, C = images.shape
    cols = cols or math.ceil(math.sqrt(B))
    rows = math.ceil(B / cols)
    out = np.zeros((rows * (H + pad) - pad, cols * (W + pad) - pad, C), dtype=np.uint8)
    for i in range(B):
        r, c = divmod(i, cols)
        out[r * (H + pad): r * (H + pad) + H, c * (W + pad): c * (W + pad) + W] = images[i]
    return out


def tile_image(images: torch.Tensor, cols: int | None = None) -> Image.Image:
    """(B, C, H, W) floats in [0, 1] -> one PIL mosaic, grayscale or RGB as the images are."""
    mosaic = tile(to_uint8(images.cpu()), cols)
    return Image.fromarray(mosaic[..., 0] if mosaic.shape[-1] == 1 else mosaic)
