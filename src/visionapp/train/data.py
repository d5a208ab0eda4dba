"""DataModules: `ShapesDataModule` (generated, the default), `FolderDataModule` (your ImageFolder) and
`TorchvisionDataModule` (CIFAR10, OxfordIIITPet, Flowers102 by name).

All three hand the model the same things: `class_names` (index order), `image_size`, `mean`/`std`, and
train/val/test loaders whose images go through `visionapp.transforms`. Bad data is reported before any
DataLoader worker starts, with the file and the fix (`DataError`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from PIL import Image
from rich.progress import track
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import datasets

from visionapp import shapes
from visionapp.transforms import IMAGE_EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD, EvalPreset, TrainPreset, load_image


class DataError(ValueError):
    """A problem with the user's data: the message names the file or folder and the fix."""


class ImageDataModule(L.LightningDataModule):
    """Shared loaders and transforms; subclasses provide the three splits and the class names."""

    def __init__(
        self,
        *,
        image_size: int = 224,
        batch_size: int = 64,
        num_workers: int = 2,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        crop_scale: tuple[float, float] = (0.7, 1.0),
    ) -> None:
        super().__init__()
        self.image_size, self.batch_size, self.num_workers = image_size, batch_size, num_workers
        self.mean, self.std = tuple(mean), tuple(std)
        # The loader workers decode and resize/augment to uint8; `normalize` runs once the batch is on its
        # device (on_after_batch_transfer). Same presets, hence the same pixels, as the bundle's EvalPreset.
        train, evaluation = (
            TrainPreset(image_size=image_size, mean=mean, std=std, crop_scale=crop_scale),
            EvalPreset(image_size=image_size, mean=mean, std=std),
        )
        self.train_transform, self.eval_transform = train.geometry, evaluation.geometry
        self.normalize = evaluation.normalize
        self.splits: dict[str, Dataset] = {}

    @property
    def class_names(self) -> list[str]:
        raise NotImplementedError

    name = "images"  # the data set's name in metrics.json

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.splits[split],
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=shuffle and len(self.splits[split]) > self.batch_size,  # type: ignore[arg-type]  # no 1-sample BatchNorm batch
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def on_after_batch_transfer(self, batch: tuple[torch.Tensor, torch.Tensor], dataloader_idx: int = 0):
        """uint8 images → normalised float32, on the batch's device (Lightning calls this for every split;
        code that iterates the loaders itself calls it too)."""
        x, y = batch
        return self.normalize(x), y

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


def scan_class_folders(split_dir: Path, *, verify: bool = True) -> list[str]:
    """Check an ImageFolder split (split_dir/<class>/<images>) and return its class names.

    Raises DataError naming the folder or file: missing folder, no class folders, an empty class folder,
    a file that is not an image or cannot be decoded.
    """
    if not split_dir.is_dir():
        raise DataError(f"{split_dir} does not exist; expected {split_dir}/<class name>/<images>")
    classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{split_dir} has no class folders; put each class's images in {split_dir}/<class name>/")
    files = []
    for c in classes:
        found = [f for f in sorted((split_dir / c).rglob("*")) if f.is_file() and not f.name.startswith(".")]
        images = [f for f in found if f.suffix.lower() in IMAGE_EXTENSIONS]
        if not images:
            raise DataError(
                f"class folder {split_dir / c} has no images ({', '.join(IMAGE_EXTENSIONS)}); "
                "add images or remove the folder"
            )
        others = sorted(set(found) - set(images))
        if others:
            raise DataError(
                f"{others[0]} is not an image file ({len(others)} such in {split_dir}); "
                "remove it or move it out of the data folder"
            )
        files += images
    if verify:
        for f in track(files, description=f"Checking {split_dir}", transient=True, disable=len(files) < 500):
            try:
                with Image.open(f) as im:
                    im.verify()
            except Exception as e:
                raise DataError(
                    f"{f} cannot be read as an image ({type(e).__name__}: {e}); delete or replace the file"
                ) from None
    return classes


def check_fractions(**fractions: float) -> None:
    """Split fractions must leave room for every split: each in [0, 1), their sum below 1."""
    for name, f in fractions.items():
        if not 0 <= f < 1:
            raise DataError(f"{name}={f} must be in [0, 1): the share of the images that go to that split")
    if sum(fractions.values()) >= 1:
        given = ", ".join(f"{k}={v}" for k, v in fractions.items())
        raise DataError(f"{given} leave nothing to train on (their sum must be below 1); lower them")


def _split_indices(n: int, fractions: Sequence[float], seed: int) -> list[list[int]]:
    """Seeded random partition of range(n): the first part takes what the fractions leave."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    sizes = [round(n * f) for f in fractions]
    parts, start = [], 0
    for s in [n - sum(sizes), *sizes]:
        parts.append(perm[start : start + s])
        start += s
    return parts


class FolderDataModule(ImageDataModule):
    """Your own images as an ImageFolder tree.

    Either `root/train/<class>/…` and `root/val/<class>/…` (optional `root/test/<class>/…`), or
    `root/<class>/…` split by a seeded fraction into train/val/test.
    """

    def __init__(
        self,
        root: str = "data/my_images",
        *,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        split_seed: int = 0,
        verify_images: bool = True,
        image_size: int = 224,
        batch_size: int = 32,
        num_workers: int = 2,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        crop_scale: tuple[float, float] = (0.35, 1.0),
    ) -> None:
        super().__init__(
            image_size=image_size,
            batch_size=batch_size,
            num_workers=num_workers,
            mean=mean,
            std=std,
            crop_scale=crop_scale,
        )
        self.root = Path(root)
        self.name = self.root.name  # the folder's name stands for the data set in metrics.json
        check_fractions(val_fraction=val_fraction, test_fraction=test_fraction)
        self.val_fraction, self.test_fraction, self.split_seed = val_fraction, test_fraction, split_seed
        self.verify_images = verify_images

    @property
    def split_layout(self) -> bool:
        return (self.root / "train").is_dir()

    @property
    def class_names(self) -> list[str]:
        if not self.root.is_dir():
            raise DataError(
                f"data folder {self.root} does not exist; point data.init_args.root at your images "
                "(root/<class>/<images> or root/train|val/<class>/<images>)"
            )
        return scan_class_folders(self.root / "train" if self.split_layout else self.root, verify=False)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        classes = self.class_names
        if not self.split_layout:
            scan_class_folders(self.root, verify=self.verify_images)
            train, evaluation = (
                datasets.ImageFolder(self.root, t, loader=load_image)
                for t in (self.train_transform, self.eval_transform)
            )
            tr, va, te = _split_indices(len(train), [self.val_fraction, self.test_fraction], self.split_seed)
            self.splits = {"train": Subset(train, tr), "val": Subset(evaluation, va), "test": Subset(evaluation, te)}
            self._check_not_empty()
            return
        if not (self.root / "val").is_dir():
            raise DataError(
                f"{self.root}/train exists but {self.root}/val does not; add a val/<class>/ split "
                f"with the same classes, or put the class folders directly in {self.root} to split "
                "them by val_fraction"
            )
        for split in ("train", "val", "test"):
            d = self.root / split
            if split == "test" and not d.is_dir():
                continue
            found = scan_class_folders(d, verify=self.verify_images)
            if found != classes:
                raise DataError(
                    f"{d} has classes {found} but {self.root}/train has {classes}; "
                    "every split needs the same class folders"
                )
            t = self.train_transform if split == "train" else self.eval_transform
            self.splits[split] = datasets.ImageFolder(d, t, loader=load_image)
        if "test" not in self.splits:  # no test/: carve a seeded test_fraction out of train, never reuse val
            train = self.splits["train"]
            tr, te = _split_indices(len(train), [self.test_fraction], self.split_seed)  # type: ignore[arg-type]
            held_out = datasets.ImageFolder(self.root / "train", self.eval_transform, loader=load_image)
            self.splits["train"], self.splits["test"] = Subset(train, tr), Subset(held_out, te)
        self._check_not_empty()

    def _check_not_empty(self) -> None:
        for split, ds in self.splits.items():
            if len(ds) == 0:  # type: ignore[arg-type]
                raise DataError(
                    f"the {split} split of {self.root} is empty ({ {k: len(v) for k, v in self.splits.items()} } "  # type: ignore[arg-type]
                    f"images); add images, or raise val_fraction/test_fraction so that each split gets some"
                )

    def split_files(self, split: str) -> list[str]:
        """The image files of a split, in the split's order (the run records the test split's for explain/)."""
        ds = self.splits[split]
        indices = ds.indices if isinstance(ds, Subset) else range(len(ds))  # type: ignore[arg-type]
        base = ds.dataset if isinstance(ds, Subset) else ds
        return [str(base.samples[i][0]) for i in indices]  # type: ignore[attr-defined]


class ShapesDataModule(FolderDataModule):
    """The generated `shapes` data set (see visionapp.shapes): made on first use, then read from disk."""

    def __init__(
        self,
        root: str = "data/shapes",
        *,
        seed: int = 0,
        num_train: int = 3000,
        num_val: int = 500,
        num_test: int = 1000,
        image_size: int = 96,
        batch_size: int = 32,
        num_workers: int = 2,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        crop_scale: tuple[float, float] = (0.8, 1.0),
    ) -> None:
        super().__init__(
            root,
            verify_images=False,
            image_size=image_size,
            batch_size=batch_size,
            num_workers=num_workers,
            mean=mean,
            std=std,
            crop_scale=crop_scale,
        )
        self.name = "shapes"
        self.seed, self.counts = seed, {"train": num_train, "val": num_val, "test": num_test}

    @property
    def class_names(self) -> list[str]:
        return list(shapes.CLASSES)

    def prepare_data(self) -> None:
        shapes.generate(
            self.root, seed=self.seed, size=self.image_size, counts=self.counts, workers=min(4, os.cpu_count() or 1)
        )


@dataclass(frozen=True)
class TorchvisionSet:
    """How to build one split of a torchvision data set: make(root, split, transform, download) → Dataset.
    `splits` are those it ships; without a "val" one, val is cut from train by val_fraction."""

    make: Callable[[str, str, Any, bool], Dataset]
    splits: tuple[str, ...] = ("train", "test")


def _fake(root: str, split: str, transform: Any, download: bool) -> Dataset:
    # CIFAR-10's shape (10 classes of 32x32 RGB) with random pixels: a stand-in that needs no download.
    size, offset = (200, 0) if split == "train" else (50, 10_000)
    return datasets.FakeData(size, (3, 32, 32), 10, transform=transform, random_offset=offset)


# The one registry of torchvision data sets a name selects (TorchvisionDataModule's `name`).
TORCHVISION_SETS: dict[str, TorchvisionSet] = {
    "cifar10": TorchvisionSet(
        lambda root, split, t, dl: datasets.CIFAR10(root, train=split == "train", transform=t, download=dl)
    ),
    "oxford_iiit_pet": TorchvisionSet(
        lambda root, split, t, dl: datasets.OxfordIIITPet(
            root, split="trainval" if split == "train" else "test", transform=t, download=dl
        )
    ),
    "flowers102": TorchvisionSet(
        lambda root, split, t, dl: datasets.Flowers102(root, split=split, transform=t, download=dl),
        ("train", "val", "test"),
    ),
    "fake": TorchvisionSet(_fake),
}


class TorchvisionDataModule(ImageDataModule):
    """A torchvision data set by name (TORCHVISION_SETS), downloaded into `root` when online; "fake" is
    random images of CIFAR-10's shape, for trying a config without a download."""

    def __init__(
        self,
        name: str = "cifar10",
        root: str = "data/torchvision",
        *,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        image_size: int = 224,
        batch_size: int = 32,
        num_workers: int = 2,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        crop_scale: tuple[float, float] = (0.35, 1.0),
    ) -> None:
        if name not in TORCHVISION_SETS:
            raise DataError(
                f"unknown torchvision data set {name!r}; choose from {tuple(TORCHVISION_SETS)}, "
                "or use FolderDataModule for your own images"
            )
        super().__init__(
            image_size=image_size,
            batch_size=batch_size,
            num_workers=num_workers,
            mean=mean,
            std=std,
            crop_scale=crop_scale,
        )
        check_fractions(val_fraction=val_fraction)
        self.set_name = self.name = name
        self.dataset = TORCHVISION_SETS[name]
        self.root = Path(root)
        self.val_fraction, self.split_seed = val_fraction, split_seed

    def _make(self, split: str, transform=None, download: bool = False) -> Dataset:
        return self.dataset.make(str(self.root), split, transform, download)

    def prepare_data(self) -> None:
        for split in self.dataset.splits:
            try:
                self._make(split, download=True)
            except Exception as e:  # URLError, socket errors, HTTP errors: all mean "could not fetch it"
                raise DataError(
                    f"could not download {self.set_name} into {self.root} ({type(e).__name__}: {e}). This machine "
                    f"may be offline: copy the data set into {self.root} from a machine that has it, or train on "
                    "your own images with FolderDataModule (configs/folder.yaml)"
                ) from None

    @property
    def class_names(self) -> list[str]:
        self.prepare_data()  # the class list comes with the data; no-op when already downloaded
        test = self._make("test")
        classes = getattr(test, "classes", None) or range(test.num_classes)  # type: ignore[attr-defined]
        return [str(c) for c in classes]

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        if "val" in self.dataset.splits:
            self.splits = {
                "train": self._make("train", self.train_transform),
                "val": self._make("val", self.eval_transform),
                "test": self._make("test", self.eval_transform),
            }
            return
        train, evaluation = self._make("train", self.train_transform), self._make("train", self.eval_transform)
        tr, va = _split_indices(len(train), [self.val_fraction], self.split_seed)  # type: ignore[arg-type]
        self.splits = {
            "train": Subset(train, tr),
            "val": Subset(evaluation, va),
            "test": self._make("test", self.eval_transform),
        }
