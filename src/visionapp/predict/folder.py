"""A folder's images as a dataset that never fails: each item is the image preprocessed by the bundle's eval
geometry (uint8, decoded in a loader worker), or the reason it could not be read."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from visionapp.decode import MAX_DECODED_PIXELS, load_image


@dataclass
class Batch:
    images: torch.Tensor  # (n, 3, H, W) uint8: the readable images of the batch
    indices: list[int]  # their positions in the file list
    failures: list[tuple[int, str]] = field(default_factory=list)  # (position, why) of those that could not be read


class FolderImages(Dataset):
    """`min_side`: decode each image only as big as the model needs (the bundle's EvalPreset.decode_side), and refuse
    one that decodes to more than MAX_DECODED_PIXELS, as the servers do: a row equals the served answer for a photo
    of any size, and a file the servers refuse is an error row here."""

    def __init__(self, files: Sequence[Path], geometry: Callable, min_side: int = 0) -> None:
        self.files, self.geometry, self.min_side = list(files), geometry, min_side

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            image = load_image(self.files[i], min_side=self.min_side, max_pixels=MAX_DECODED_PIXELS)
            return i, self.geometry(image), None
        except Exception as e:  # a corrupt file, a file that is not an image, a decompression bomb: a row in errors
            return i, None, f"{type(e).__name__}: {e}"


def collate(items: list[tuple[int, torch.Tensor | None, str | None]]) -> Batch:
    good = [(i, x) for i, x, _ in items if x is not None]
    images = torch.stack([x for _, x in good]) if good else torch.empty(0, dtype=torch.uint8)
    return Batch(images, [i for i, _ in good], [(i, str(err)) for i, x, err in items if x is None])
