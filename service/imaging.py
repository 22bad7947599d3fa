"""Uploaded image bytes in: the upload policy. Runs on the I/O thread pool, never on the event
loop (answers are encoded by service.responses).

Upload policy (POST /encode), applied in this order:
1. Formats: PNG, JPEG and WebP, recognised from the bytes (anything else: 415).
2. Size: width x height is read from the header, before any pixel is decoded; past
   TAMING_MAX_IMAGE_PIXELS the image is refused with 413 (decompression bombs). Pixel data
   is never inflated past what the header allows, and compressed PNG metadata (zTXt, iTXt,
   iCCP) is bounded in count and size: past those bounds, 422.
3. Animated images (APNG, animated WebP) are refused with 422, not silently cut to one frame.
4. Truncated or corrupt data (bad CRC, cut-off file): 422.
5. EXIF orientation is applied.
6. Colour: transparency is composited onto black, the background of the training images
   (MNIST and Fashion-MNIST draw light objects on black); 16-bit images are scaled to 8 bits;
   then the image is converted to the model's channels (1: luma "L", 3: "RGB").
7. Size: an image of another shape is padded with black to the model's aspect ratio (centred,
   nothing is cropped), then resized to the model's image size with Lanczos filtering.

A plain PNG already at the model's size and channels (see service.png.simple_png_pixels)
skips PIL: the steps above would not change a pixel of it.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps, PngImagePlugin, UnidentifiedImageError

from .errors import ServiceError
from .png import PNG_SIGNATURE, refusal, simple_png_pixels

FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
MEDIA_TYPES = frozenset(FORMATS.values()) | {"image/jpg"}

# Our own pixel limit (TAMING_MAX_IMAGE_PIXELS) decides, from the header, before any pixel is
# decoded (open_checked). PIL's own limit would refuse a huge header inside Image.open, before
# our check, with a message quoting PIL's limit instead of ours; it is off.
Image.MAX_IMAGE_PIXELS = None
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
# PIL inflates each zTXt, iTXt and iCCP chunk up to MAX_TEXT_CHUNK and keeps up to
# MAX_TEXT_MEMORY of text per image; pinned so that a Pillow upgrade cannot loosen them
PngImagePlugin.MAX_TEXT_CHUNK = 512 * 1024
PngImagePlugin.MAX_TEXT_MEMORY = 16 * 1024 * 1024
ImageFile.LOAD_TRUNCATED_IMAGES = False  # over-limit and cut-off data raise, never pass


def _too_large(w: int, h: int, limit: int) -> ServiceError:
    return ServiceError(413, "image_too_large",
                        f"image of {w}x{h} = {w * h} pixels exceeds the limit of {limit} pixels")


def open_checked(data: bytes, max_pixels: int) -> Image.Image:
    """Open from the header only, check format, pixel count and frames, then decode."""
    reason = refusal(data)
    if reason is not None:
        raise ServiceError(422, "invalid_image", reason)
    try:
        im = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        if "MAX_TEXT" in str(e):  # PIL's limits on zTXt, iTXt and iCCP
            raise ServiceError(422, "invalid_image", "the PNG's metadata inflates past "
                               f"{PngImagePlugin.MAX_TEXT_CHUNK} bytes") from e
        raise ServiceError(422, "invalid_image", "the bytes are not a readable image") from e
    if im.format not in FORMATS:
        raise ServiceError(415, "unsupported_media_type",
                           f"{im.format} images are not supported; send PNG, JPEG or WebP")
    w, h = im.size
    if w * h > max_pixels:
        raise _too_large(w, h, max_pixels)
    if w < 1 or h < 1:
        raise ServiceError(422, "invalid_image", f"image of {w}x{h} pixels is empty")
    if getattr(im, "n_frames", 1) > 1:
        raise ServiceError(422, "animated_image",
                           "animated images are not supported; send a single frame")
    try:
        im.load()
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise ServiceError(422, "invalid_image", f"truncated or corrupt {im.format} image") from e
    return im


def _to_8bit(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(im).astype(np.float32)
        scale = 257.0 if im.mode.startswith("I;16") or a.max(initial=0) > 255 else 1.0
        return Image.fromarray(np.clip(a / scale + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode == "F":
        a = np.asarray(im)
        return Image.fromarray(np.clip(np.nan_to_num(a) + 0.5, 0, 255).astype(np.uint8), "L")
    return im


def convert(im: Image.Image, channels: int) -> Image.Image:
    """Any mode -> "L" or "RGB", alpha composited onto black."""
    im = _to_8bit(im)
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("LA", "La", "PA", "RGBA", "RGBa") or (
            im.mode in ("L", "RGB") and "transparency" in im.info):
        rgba = np.asarray(im.convert("RGBA"), dtype=np.float32)
        rgb = rgba[..., :3] * (rgba[..., 3:] / 255.0)  # over black
        im = Image.fromarray((rgb + 0.5).astype(np.uint8), "RGB")
    if im.mode not in ("L", "RGB"):
        im = im.convert("RGB")  # CMYK, YCbCr, LAB, HSV, 1
    target = "L" if channels == 1 else "RGB"
    return im if im.mode == target else im.convert(target)


def fit(im: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Pad with black to the target aspect ratio (centred), then resize to (H, W)."""
    H, W = size
    w, h = im.size
    if (w, h) == (W, H):
        return im
    # smallest canvas with the target aspect that holds the image
    cw, ch = max(w, round(h * W / H)), max(h, round(w * H / W))
    if (cw, ch) != (w, h):
        canvas = Image.new(im.mode, (cw, ch), 0)
        canvas.paste(im, ((cw - w) // 2, (ch - h) // 2))
        im = canvas
    return im.resize((W, H), Image.Resampling.LANCZOS, reducing_gap=3.0)


def header_pixels(blobs: list[bytes]) -> int | None:
    """Pixels the uploads claim in their headers (cheap: nothing is decoded); None if unknown.

    A PNG's size sits at a fixed place (its IHDR chunk comes first), so it is read straight
    from the bytes; other formats go through PIL's header parser.
    """
    total = 0
    for data in blobs:
        if data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR" and len(data) >= 24:
            total += int.from_bytes(data[16:20], "big") * int.from_bytes(data[20:24], "big")
            continue
        try:
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                total += w * h
        except Exception:  # the real path reports what is wrong
            return None
    return total


def prepare(blobs: list[bytes], channels: int, size: tuple[int, int],
            max_pixels: int) -> np.ndarray:
    """Uploaded files -> uint8 pixels (N, H, W, C) at the model's size, for the tokenizer."""
    out = np.empty((len(blobs), size[0], size[1], channels), dtype=np.uint8)
    for i, data in enumerate(blobs):
        plain = simple_png_pixels(data, channels, size)
        if plain is not None:  # already what the model takes: the same pixels without PIL
            out[i] = plain
            continue
        try:
            im = open_checked(data, max_pixels)
        except ServiceError as e:
            if len(blobs) > 1:
                e.message = f"image {i}: {e.message}"
            raise
        im = fit(convert(ImageOps.exif_transpose(im) or im, channels), size)
        a = np.asarray(im, dtype=np.uint8)
        out[i] = a[..., None] if a.ndim == 2 else a
    return out
