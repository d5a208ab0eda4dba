"""Preprocessing for torch: the eval transform as tensors, the training augmentation, the batched device crop.

Decoding and the eval resize themselves live in `visionapp.decode` (Pillow and numpy: the slim predictor runs them
without torch); `EvalPreset` is them as tensors. Training's eval batches, the Captum heatmaps, predict-folder and both
servers call it; none re-implements it, so a served prediction equals the in-process one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torchvision.ops import roi_align
from torchvision.transforms import v2

from visionapp.decode import IMAGENET_MEAN, IMAGENET_STD, decode_side, load_image, resize


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
    """Eval transform: the whole image resized to image_size x image_size (`geometry`: `visionapp.decode.resize`, as a
    uint8 tensor), then `normalize`."""

    def __init__(
        self, *, image_size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
    ) -> None:
        self.image_size = image_size
        self.decode_side = decode_side(image_size)
        self.normalize = to_model_input(mean, std)

    def geometry(self, img: Image.Image) -> torch.Tensor:
        return torch.from_numpy(resize(img, self.image_size))

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.normalize(self.geometry(img))

    def load(self, source: str | Path | bytes) -> torch.Tensor:
        """A file or its bytes, decoded as the servers and predict-folder decode it (load_image's min_side), as the
        model's input: what they answer for it."""
        return self(load_image(source, min_side=self.decode_side))
