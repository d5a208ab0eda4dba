"""Decoding an image and resizing it for the model: Pillow and numpy only, so that the slim predictor (no torch)
preprocesses exactly as every other consumer does.

`load_image` decodes what real uploads contain; `resize` is THE eval resize (the whole image to the model's square
input, antialiased bilinear: Pillow's filter, which torchvision's antialiased uint8 resize reproduces within one grey
level); `normalize` makes a uint8 batch the model's float input. `visionapp.transforms` wraps them for torch.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from visionapp.imagefiles import IMAGE_FORMATS

# An image decoding to more pixels is refused (decompression bombs): ~6300 x 6300, counted at the scale it is decoded
# at (a JPEG decoded at an eighth a side counts an eighth squared). The servers and predict-folder apply it.
MAX_DECODED_PIXELS = 40_000_000

# The normalisation of every torchvision ImageNet classification weight (weights.transforms().mean/std).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_image(source: str | Path | bytes, min_side: int = 0, max_pixels: int | None = None) -> Image.Image:
    """Decode a file path or raw bytes into an upright 8-bit RGB image.

    Handles what real uploads contain: EXIF orientation, CMYK, palette and RGBA, 16-bit grayscale
    (scaled, not clipped to white), animated GIF (first frame). Only the formats IMAGE_FORMATS names are decoded;
    raises PIL's errors (UnidentifiedImageError for anything else) and whatever a malformed file makes a decoder
    raise.

    `min_side` > 0 decodes no more than a consumer that needs `min_side` pixels a side can use (`EvalPreset.
    decode_side`): a JPEG at a reduced DCT scale (Pillow's draft), any image then shrunk by a whole factor (box
    average) while both sides stay at least `min_side`. A 36-megapixel photo is then never held whole in RGB.
    `max_pixels` refuses (DecompressionBombError) an image whose pixels, at the scale it is decoded at, exceed it.
    """
    img: Image.Image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source, formats=IMAGE_FORMATS)
    img.seek(0)  # first frame of an animation
    if min_side and min(img.size) >= 2 * min_side:
        scale = min(img.size) / min_side
        img.draft(img.mode, (math.ceil(img.width / scale), math.ceil(img.height / scale)))  # JPEG only; else no-op
    if max_pixels is not None and img.width * img.height > max_pixels:
        raise Image.DecompressionBombError(
            f"{img.width} x {img.height} = {img.width * img.height} pixels when decoded, over {max_pixels}"
        )
    img.load()  # truncated files fail here
    img = _to_8bit(img)
    if min_side and min(img.size) >= 2 * min_side:
        img = img.reduce(min(img.size) // min_side)
    img = ImageOps.exif_transpose(img)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite transparency on white: what a viewer shows, instead of whatever colour hides under alpha 0.
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, rgba)
    return img.convert("RGB")


_GREY16 = (np.arange(65536) / 65535.0 * 255.0).round().astype(np.uint8)  # 16-bit grey level -> 8-bit, rounded


def _to_8bit(img: Image.Image) -> Image.Image:
    """16/32-bit integer grey scaled to 8 bits (the used range to 0..255 instead of Pillow's clip at 255), through a
    lookup table: one uint8 copy, never float64. Palette and 1-bit images become modes that `reduce` takes."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(img)
        if img.mode == "I":  # 32-bit: 16-bit data stored wide, or 8-bit data
            a = np.clip(a, 0, 65535) if a.max() > 255 else (np.clip(a, 0, 255) * 257)
        return Image.fromarray(_GREY16[a])
    if img.mode == "1":
        return img.convert("L")
    if img.mode in ("P", "PA"):
        return img.convert("RGBA" if img.mode == "PA" or "transparency" in img.info else "RGB")
    return img


def decode_side(image_size: int) -> int:
    """The pixels a side an image is decoded to keep for a model of `image_size` (load_image's min_side): twice the
    input size, from which the antialiased resize gives what it gives from the whole photo, to a grey level or so."""
    return 2 * image_size


def resize(img: Image.Image, size: int) -> np.ndarray:
    """The whole RGB image resized to size x size (antialiased bilinear), as uint8 (3, size, size): nothing the user
    sent is cut off, and a heatmap maps back onto the image by a plain resize."""
    # A contiguous (and so writable) copy in channels-first order: what a batch is stacked from.
    return np.ascontiguousarray(np.asarray(img.resize((size, size), Image.Resampling.BILINEAR)).transpose(2, 0, 1))


def normalize(
    batch: np.ndarray, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> np.ndarray:
    """uint8 images (N, 3, H, W) → the model's float32 input: scaled to [0, 1], then (x - mean) / std per channel."""
    m = np.asarray(mean, np.float32)[:, None, None]
    s = np.asarray(std, np.float32)[:, None, None]
    return ((batch.astype(np.float32) / np.float32(255) - m) / s).astype(np.float32, copy=False)
