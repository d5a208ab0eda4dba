"""The one place preprocessing lives: image decoding, train augmentation and the eval transform.

Training's eval transform, the Captum heatmaps (explain/) and the TorchServe handler (serve/) all call
`load_image` and `EvalPreset`; none re-implements them, so a served prediction equals the in-process one.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms import v2

# The normalisation of every torchvision ImageNet classification weight (weights.transforms().mean/std).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The file extensions taken for images when a folder is read (training data, the heatmap script's inputs).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


def load_image(source: str | Path | bytes) -> Image.Image:
    """Decode a file path or raw bytes into an upright 8-bit RGB image.

    Handles what real uploads contain: EXIF orientation, CMYK, palette and RGBA, 16-bit grayscale
    (scaled, not clipped to white), animated GIF (first frame). Raises PIL's errors for non-images.
    """
    img: Image.Image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    img.seek(0)  # first frame of an animation
    img = ImageOps.exif_transpose(img)  # also loads the pixels, so truncated files fail here
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit integer grayscale: scale the used range to 0..255 instead of PIL's clip at 255.
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray((a / hi * 255.0).round().clip(0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite transparency on white: what a viewer shows, instead of whatever colour hides under alpha 0.
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, rgba)
    return img.convert("RGB")


def to_model_input(mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> v2.Compose:
    """uint8 image(s) → normalised float32: one image (C, H, W) or a batch (N, C, H, W), on any device.

    The DataModules ship uint8 batches from their loader workers and apply this after the batch reached its
    device (`on_after_batch_transfer`): a quarter of the bytes through shared and pinned memory, and the
    arithmetic on the GPU when there is one.
    """
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))])


class TrainPreset:
    """Training augmentation: random crop-resize and flip (`geometry`, uint8), then `normalize`."""

    def __init__(
        self,
        *,
        image_size: int,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        crop_scale: tuple[float, float] = (0.7, 1.0),
        hflip_prob: float = 0.5,
    ) -> None:
        self.geometry = v2.Compose(
            [
                v2.ToImage(),
                v2.RandomResizedCrop((image_size, image_size), scale=crop_scale, antialias=True),
                v2.RandomHorizontalFlip(hflip_prob),
            ]
        )
        self.normalize = to_model_input(mean, std)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.normalize(self.geometry(img))


class EvalPreset:
    """Eval transform: resize the whole image to image_size x image_size (`geometry`, uint8), then `normalize`.

    The whole image is resized (no centre crop) so that nothing the user sent is cut off and a heatmap
    maps back onto the original image by a plain resize.
    """

    def __init__(
        self, *, image_size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
    ) -> None:
        self.image_size = image_size
        self.geometry = v2.Compose([v2.ToImage(), v2.Resize((image_size, image_size), antialias=True)])
        self.normalize = to_model_input(mean, std)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.normalize(self.geometry(img))
