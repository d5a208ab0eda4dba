"""The one place preprocessing lives: image decoding, train augmentation and the eval transform.

Training's eval transform, the Captum heatmaps (explain/) and the TorchServe handler (serve/) all call
`load_image` and `EvalPreset`; none re-implements them, so a served prediction equals the in-process one.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.ops import roi_align
from torchvision.transforms import v2

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


def to_model_input(mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> v2.Compose:
    """uint8 image(s) → normalised float32: one image (C, H, W) or a batch (N, C, H, W), on any device.

    The DataModules ship uint8 batches from their loader workers and apply this after the batch reached its
    device (`on_after_batch_transfer`): a quarter of the bytes through shared and pinned memory, and the
    arithmetic on the GPU when there is one.
    """
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))])


RATIO = (3 / 4, 4 / 3)  # the crops' aspect-ratio range (RandomResizedCrop's default), in both augmentations


class BatchRandomResizedCrop:
    """RandomResizedCrop + horizontal flip for a whole uint8 batch (N, 3, H, W) on its device, each image with
    its own parameters drawn from `generator`: the same distribution as `TrainPreset.geometry` per image.

    The parameters follow v2.RandomResizedCrop.make_params (ten tries at a scale and log-uniform aspect ratio,
    whole image otherwise), vectorised; the crops are resampled with roi_align, which averages
    ceil(crop / output) samples per output pixel when shrinking, as antialiasing does. On a GPU this is one
    kernel for the batch; on the CPU the per-image v2 path is faster (docs/performance.md).
    """

    def __init__(
        self,
        image_size: int,
        *,
        scale: tuple[float, float],
        ratio: tuple[float, float] = RATIO,
        hflip_prob: float = 0.5,
    ) -> None:
        self.size, self.scale, self.hflip_prob = image_size, scale, hflip_prob
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))

    def boxes(self, n: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
        """(n, 4) integer crop boxes (left, top, right, bottom), drawn as v2.RandomResizedCrop draws them."""
        dev = generator.device
        area = height * width * torch.empty(n, 10, device=dev).uniform_(*self.scale, generator=generator)
        aspect = torch.exp(torch.empty(n, 10, device=dev).uniform_(*self.log_ratio, generator=generator))
        w, h = torch.sqrt(area * aspect).round(), torch.sqrt(area / aspect).round()
        ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = ok.int().argmax(dim=1, keepdim=True)  # the first try that fits, as the loop takes it
        found = ok.any(dim=1)
        w = torch.where(found, w.gather(1, first)[:, 0], float(width))  # none fits: the whole (square) image
        h = torch.where(found, h.gather(1, first)[:, 0], float(height))
        top = (torch.rand(n, device=dev, generator=generator) * (height - h + 1)).floor()
        left = (torch.rand(n, device=dev, generator=generator) * (width - w + 1)).floor()
        return torch.stack([left, top, left + w, top + h], dim=1)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n, _, height, width = images.shape
        boxes = self.boxes(n, height, width, generator)
        rois = torch.cat([torch.arange(n, device=images.device, dtype=boxes.dtype)[:, None], boxes], dim=1)
        # aligned=True: a box [0, W] covers pixels 0..W-1 exactly, as the integer crop of the per-image path does.
        out = roi_align(
            images.float(), rois, (self.size, self.size), spatial_scale=1.0, sampling_ratio=-1, aligned=True
        )
        flip = torch.rand(n, device=images.device, generator=generator) < self.hflip_prob
        out = torch.where(flip[:, None, None, None], out.flip(-1), out)
        return out.round_().clamp_(0, 255).to(torch.uint8)


class TrainPreset:
    """Training augmentation: random crop-resize and flip (`geometry`, uint8, per image; `batch`, a whole batch
    on its device), then `normalize`."""

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
                v2.RandomResizedCrop((image_size, image_size), scale=crop_scale, ratio=RATIO, antialias=True),
                v2.RandomHorizontalFlip(hflip_prob),
            ]
        )
        self.batch = BatchRandomResizedCrop(image_size, scale=crop_scale, ratio=RATIO, hflip_prob=hflip_prob)
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
        # Decoding keeps at least twice the input size a side (load_image's min_side): the antialiased resize
        # from there gives what it gives from the whole photo, to a grey level or so.
        self.decode_side = 2 * image_size
        self.geometry = v2.Compose([v2.ToImage(), v2.Resize((image_size, image_size), antialias=True)])
        self.normalize = to_model_input(mean, std)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.normalize(self.geometry(img))

    def load(self, source: str | Path | bytes) -> torch.Tensor:
        """A file or its bytes, decoded as the servers and predict-folder decode it (load_image's min_side), as the
        model's input: what they answer for it."""
        return self(load_image(source, min_side=self.decode_side))
