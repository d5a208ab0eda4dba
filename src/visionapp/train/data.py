"""DataModules: `ShapesDataModule` (generated, the default), `FolderDataModule` (your ImageFolder) and
`TorchvisionDataModule` (CIFAR10, OxfordIIITPet, Flowers102 by name).

All three hand the model the same things: `class_names` (index order), `image_size`, `mean`/`std`, and
train/val/test loaders whose images go through `visionapp.transforms`. Bad data is reported before any
DataLoader worker starts, with the file and the fix (`DataError`).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import lightning as L
import torch
from PIL import Image
from rich.progress import track
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset
from torchvision import datasets

from visionapp import imagefiles, shapes
from visionapp.decode import IMAGENET_MEAN, IMAGENET_STD, load_image
from visionapp.errors import UserError
from visionapp.train.cache import CachedSplit, DecodeError, DeviceLoader, ImageCache, open_or_build, source_files
from visionapp.transforms import EvalPreset, TrainPreset


class ImageFolder(datasets.ImageFolder):
    """torchvision's ImageFolder with `visionapp.imagefiles`' rules for classes and images (its own counts hidden
    folders as classes, takes `._` files and leaves GIFs out)."""

    def __init__(self, root: str | Path, loader: Callable[[str], Any]) -> None:
        super().__init__(str(root), loader=loader)

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        classes = imagefiles.find_classes(directory)
        return classes, {c: i for i, c in enumerate(classes)}

    @staticmethod
    def make_dataset(  # type: ignore[override]
        directory: str | Path, class_to_idx: dict[str, int], *args: Any, **kwargs: Any
    ) -> list[tuple[str, int]]:
        # Empty classes are allowed here: the data module's scan has named them already, with the fix.
        return [
            (str(f), i) for c, i in sorted(class_to_idx.items()) for f in imagefiles.find_images(Path(directory, c))
        ]


class DataError(UserError, ValueError):
    """A problem with the user's data: the message names the file or folder and the fix."""


Loader = Literal["auto", "device", "workers"]


@dataclass(frozen=True)
class LoaderConfig:
    """How every DataModule makes its batches (`data.init_args.loader` in YAML, `--data.init_args.loader.mode=...`
    on the command line): one set of options for all data sets, so a new one is added in one place.

      mode     workers: DataLoader workers read each image from the decode-once cache (cache.py; in cache_dir, by
               default <root>.cache beside the data) and crop/flip it, or, with cache false, decode its file every
               epoch; device: no workers, the cache sits on the training device (or in pinned memory when it does
               not fit in device_memory_fraction of a GPU's) and whole batches are cropped/flipped there; auto:
               device on a GPU when the cache fits, workers otherwise (on the CPU the per-image crops in workers
               are the faster path: docs/performance.md)
      cache_size  the side of the train split's cached squares; by default large enough for the smallest crop
    """

    mode: Loader = "auto"
    num_workers: int = 2
    cache: bool = True
    cache_dir: str | None = None
    cache_size: int | None = None
    device_memory_fraction: float = 0.5

    def __post_init__(self) -> None:
        if self.mode not in get_args(Loader):
            raise DataError(f"loader.mode={self.mode!r} is not one of {get_args(Loader)}")
        if self.mode == "device" and not self.cache:
            raise DataError("loader.mode=device serves batches from the decode-once cache: set loader.cache true "
                            "(or use mode workers)")  # fmt: skip


def train_cache_size(image_size: int, crop_scale: tuple[float, float]) -> int:
    """The side of the train split's cached squares: the smallest crop (crop_scale[0] of the area) still spans
    about image_size pixels, rounded up to a multiple of 8."""
    return -(-math.ceil(image_size / math.sqrt(crop_scale[0])) // 8) * 8


class _Transformed(Dataset):
    """A split decoded from its files on every read (no cache): `transform` applied to each image."""

    def __init__(self, source: Dataset, transform: Callable) -> None:
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, label = self.source[i]
        return self.transform(image), label


class Images(Dataset):
    """Image files that are none of the classes, as (PIL image, -1) items: outliers, out-of-distribution sets."""

    def __init__(self, files: list[Path]) -> None:
        self.samples = [(str(f), -1) for f in files]  # ImageFolder's attribute: the cache fingerprints the files

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return load_image(self.samples[i][0]), -1


class ImageDataModule(L.LightningDataModule):
    """Shared loaders and transforms; subclasses provide the three splits (`source_splits`) and the class names.
    How batches are made is a `LoaderConfig`, the same for every subclass."""

    def __init__(
        self,
        *,
        image_size: int = 224,
        batch_size: int = 64,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        crop_scale: tuple[float, float] = (0.7, 1.0),
        loader: LoaderConfig = LoaderConfig(),
    ) -> None:
        super().__init__()
        self.image_size, self.batch_size = image_size, batch_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.loader = loader
        self.cache_size = loader.cache_size or train_cache_size(image_size, crop_scale)
        # The loader workers (or the cache) give uint8 images; `normalize` runs once the batch is on its device
        # (on_after_batch_transfer). Same presets, hence the same pixels, as the bundle's EvalPreset.
        self.train_preset = TrainPreset(image_size=image_size, mean=mean, std=std, crop_scale=crop_scale)
        evaluation = EvalPreset(image_size=image_size, mean=mean, std=std)
        self.train_transform, self.eval_transform = self.train_preset.geometry, evaluation.geometry
        self.normalize = evaluation.normalize
        self.sources: dict[str, Dataset] = {}  # the splits as (PIL image, label) items
        self.caches: dict[str, ImageCache] = {}
        self.splits: dict[str, Dataset] = {}  # what the worker loaders read: (uint8 image, label) items
        self.target_device: torch.device | None = None  # where batches go when no trainer says (benchmarks)

    @property
    def class_names(self) -> list[str]:
        raise NotImplementedError

    name = "images"  # the data set's name in metrics.json

    def source_splits(self) -> dict[str, Dataset]:
        """train, val and test as datasets of (PIL image, label), checked; subclasses define them."""
        raise NotImplementedError

    def prepare_data(self) -> None:
        # Lightning runs this once per machine before any process's setup: the caches are built here, once.
        if self.loader.cache:
            self._open_caches(self.all_sources())

    def _open_caches(self, sources: dict[str, Dataset]) -> dict[str, ImageCache]:
        root = Path(getattr(self, "root", "")).resolve()
        base = (
            Path(self.loader.cache_dir) if self.loader.cache_dir else root.with_name(root.name + ".cache")
        )  # beside the data
        folder = base / f"{self.name}-{hashlib.sha256(str(root).encode()).hexdigest()[:8]}"
        key = {"data": type(self).__name__, "name": self.name, "root": str(root)}
        caches = {}
        for split, source in sources.items():
            # val/test: EvalPreset's output as it is; train: the same whole-image resize at the cache's larger size,
            # to crop from every epoch.
            size = self.cache_size if split == "train" else self.image_size
            geometry = EvalPreset(image_size=size).geometry if split == "train" else self.eval_transform
            try:
                caches[split] = open_or_build(
                    folder / f"{split}-{size}px", source, geometry, size, {**key, "split": split},
                    workers=self.loader.num_workers,
                )  # fmt: skip
            except DecodeError as e:
                raise DataError(f"{e}; delete or replace the file") from None
        return caches

    def all_sources(self) -> dict[str, Dataset]:
        """The splits the loaders read: the train split with the training outliers added (label -1), if any."""
        sources = self.source_splits()
        outliers = self.outliers("train")
        if outliers is not None:
            sources["train"] = ConcatDataset([sources["train"], outliers])
        return sources

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        self.sources = self.all_sources()
        if not self.loader.cache:
            self.splits = {
                split: _Transformed(source, self.train_transform if split == "train" else self.eval_transform)
                for split, source in self.sources.items()
            }
            return
        self.caches = self._open_caches(self.sources)
        self.splits = {
            split: CachedSplit(cache, self.train_transform if split == "train" else None)
            for split, cache in self.caches.items()
        }

    def ood_sets(self) -> dict[str, Dataset]:
        """Out-of-distribution sets to measure the scores on, by name, as (PIL image, label) datasets; none here."""
        return {}

    def outliers(self, split: str) -> Dataset | None:
        """Images that are none of the classes, for outlier exposure (train) and choosing the score (val); none here."""
        return None

    def eval_loader(self, dataset: Dataset) -> DataLoader:
        """Any (PIL image, label) dataset through the eval preprocessing, in batches (no cache): OOD sets, outliers."""
        return DataLoader(_Transformed(dataset, self.eval_transform), batch_size=self.batch_size,
                          num_workers=self.loader.num_workers)  # fmt: skip

    def split_files(self, split: str) -> list[str]:
        """The image files of a split, in the split's order (the run records the test split's for explain/)."""
        return source_files(self.sources[split]) or []

    @property
    def device(self) -> torch.device:
        """The device the batches go to: the trainer's; for code that iterates the loaders itself, target_device
        or the CPU."""
        if self.trainer is not None:
            return self.trainer.strategy.root_device
        return self.target_device or torch.device("cpu")

    def loader_path(self, split: str) -> Literal["device", "workers"]:
        if self.loader.mode != "auto":
            return self.loader.mode
        if self.device.type != "cuda" or split not in self.caches:
            return "workers"
        return "device" if self._fits_on_device(split) else "workers"

    def _fits_on_device(self, split: str) -> bool:
        total = torch.cuda.get_device_properties(self.device).total_memory
        return self.caches[split].nbytes <= self.loader.device_memory_fraction * total

    def _loader(self, split: str, shuffle: bool) -> DataLoader | DeviceLoader:
        if self.loader_path(split) == "device":
            trainer = self.trainer
            return DeviceLoader(
                self.caches[split],
                batch_size=self.batch_size,
                device=self.device,
                resident=self.device.type == "cpu" or self._fits_on_device(split),
                shuffle=shuffle,
                augment=self.train_preset.batch if split == "train" else None,
                seed=torch.initial_seed() % 2**32,  # seed_everything's seed, so runs repeat
                rank=trainer.global_rank if trainer is not None else 0,
                world_size=trainer.world_size if trainer is not None else 1,
            )
        return DataLoader(
            self.splits[split],
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=shuffle and len(self.splits[split]) > self.batch_size,  # type: ignore[arg-type]  # no 1-sample BatchNorm batch
            num_workers=self.loader.num_workers,
            persistent_workers=self.loader.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def on_after_batch_transfer(self, batch: tuple[torch.Tensor, torch.Tensor], dataloader_idx: int = 0):
        """uint8 images → normalised float32, on the batch's device (Lightning calls this for every split;
        code that iterates the loaders itself calls it too)."""
        x, y = batch
        return self.normalize(x), y

    def train_dataloader(self) -> DataLoader | DeviceLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader | DeviceLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader | DeviceLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader | DeviceLoader:
        return self._loader("test", shuffle=False)


def scan_class_folders(split_dir: Path, *, verify: bool = True) -> list[str]:
    """Check an ImageFolder split (split_dir/<class>/<images>) and return its class names.

    Classes and images are found as everywhere else (visionapp.imagefiles: hidden folders and files skipped).
    Raises DataError naming the folder or file: missing folder, fewer than two class folders, a class folder with
    no images, a file that is not an image or cannot be decoded.
    """
    if not split_dir.is_dir():
        raise DataError(f"{split_dir} does not exist; expected {split_dir}/<class name>/<images>")
    classes = imagefiles.find_classes(split_dir)
    if not classes:
        raise DataError(f"{split_dir} has no class folders; put each class's images in {split_dir}/<class name>/")
    if len(classes) == 1:
        raise DataError(
            f"{split_dir} has one class folder ({classes[0]}); a classifier needs at least two: "
            f"add a folder of images for each other class beside {split_dir / classes[0]}"
        )
    files = []
    for c in classes:
        found = imagefiles.walk_files(split_dir / c)
        images = [f for f in found if imagefiles.is_image_file(f)]
        if not images:
            raise DataError(
                f"class folder {split_dir / c} has no images ({', '.join(imagefiles.IMAGE_EXTENSIONS)}); "
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
                with Image.open(f, formats=imagefiles.IMAGE_FORMATS) as im:
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
        ood_root: str | None = None,
        image_size: int = 224,
        batch_size: int = 32,
        crop_scale: tuple[float, float] = (0.35, 1.0),
        **common: Any,  # mean, std, loader: ImageDataModule's, the same for every data set
    ) -> None:
        super().__init__(
            image_size=image_size,
            batch_size=batch_size,
            crop_scale=crop_scale,
            **common,
        )
        self.root = Path(root)
        self.ood_root = Path(ood_root) if ood_root else None
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

    def source_splits(self) -> dict[str, Dataset]:
        classes = self.class_names
        # With the cache on, building it decodes every image and names a bad one: no separate verification pass.
        verify = self.verify_images and not self.loader.cache
        if not self.split_layout:
            scan_class_folders(self.root, verify=verify)
            images = ImageFolder(self.root, loader=load_image)
            tr, va, te = _split_indices(len(images), [self.val_fraction, self.test_fraction], self.split_seed)
            return self._check_not_empty(
                {"train": Subset(images, tr), "val": Subset(images, va), "test": Subset(images, te)}
            )
        if not (self.root / "val").is_dir():
            raise DataError(
                f"{self.root}/train exists but {self.root}/val does not; add a val/<class>/ split "
                f"with the same classes, or put the class folders directly in {self.root} to split "
                "them by val_fraction"
            )
        splits: dict[str, Dataset] = {}
        for split in ("train", "val", "test"):
            d = self.root / split
            if split == "test" and not d.is_dir():
                continue
            found = scan_class_folders(d, verify=verify)
            if found != classes:
                raise DataError(
                    f"{d} has classes {found} but {self.root}/train has {classes}; "
                    "every split needs the same class folders"
                )
            splits[split] = ImageFolder(d, loader=load_image)
        if "test" not in splits:  # no test/: carve a seeded test_fraction out of train, never reuse val
            train = splits["train"]
            tr, te = _split_indices(len(train), [self.test_fraction], self.split_seed)  # type: ignore[arg-type]
            splits["train"], splits["test"] = Subset(train, tr), Subset(train, te)
        return self._check_not_empty(splits)

    def ood_sets(self) -> dict[str, Dataset]:
        """ood_root's images that are none of the classes, to measure the out-of-distribution scores on: each folder
        under it a set (its images at any depth), or the whole folder as one set `ood` when it holds images itself."""
        root = self.ood_root
        if root is None:
            return {}
        if not root.is_dir():
            raise DataError(
                f"ood_root {root} does not exist; point it at a folder of images that are none of the classes"
            )
        loose = [f for f in root.iterdir() if f.is_file() and imagefiles.is_image_file(f)]
        if loose:
            return {"ood": Images(imagefiles.find_images(root))}
        folders = [d for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")]
        found = {d.name: imagefiles.find_images(d) for d in folders}
        sets: dict[str, Dataset] = {name: Images(files) for name, files in found.items() if files}
        if not sets:
            raise DataError(f"ood_root {root} holds no images ({', '.join(imagefiles.IMAGE_EXTENSIONS)})")
        return sets

    def _check_not_empty(self, splits: dict[str, Dataset]) -> dict[str, Dataset]:
        for split, ds in splits.items():
            if len(ds) == 0:  # type: ignore[arg-type]
                raise DataError(
                    f"the {split} split of {self.root} is empty ({ {k: len(v) for k, v in splits.items()} } "  # type: ignore[arg-type]
                    f"images); add images, or raise val_fraction/test_fraction so that each split gets some"
                )
        return splits


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
        crop_scale: tuple[float, float] = (0.8, 1.0),
        outlier_exposure: bool = True,
        **common: Any,  # mean, std, loader: ImageDataModule's
    ) -> None:
        super().__init__(
            root,
            verify_images=False,
            image_size=image_size,
            batch_size=batch_size,
            crop_scale=crop_scale,
            **common,
        )
        self.cache_size = self.loader.cache_size or image_size  # generated at image_size: crops come from them
        self.name = "shapes"
        self.seed, self.counts = seed, {"train": num_train, "val": num_val, "test": num_test}
        self.outlier_exposure = outlier_exposure
        self.ood_root = self.root / "ood"  # near: held-out shapes; far: other kinds of image (visionapp.shapes)

    def outliers(self, split: str) -> Dataset | None:
        """The generated training outliers (kinds never measured), labelled -1; with outlier_exposure off, none."""
        if not self.outlier_exposure:
            return None
        return Images(imagefiles.find_images(self.root / "outliers" / split))

    @property
    def class_names(self) -> list[str]:
        return list(shapes.CLASSES)

    def prepare_data(self) -> None:
        shapes.generate(
            self.root, seed=self.seed, size=self.image_size, counts=self.counts, workers=min(4, os.cpu_count() or 1)
        )
        super().prepare_data()


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
        crop_scale: tuple[float, float] = (0.35, 1.0),
        **common: Any,  # mean, std, loader: ImageDataModule's, the same for every data set
    ) -> None:
        if name not in TORCHVISION_SETS:
            raise DataError(
                f"unknown torchvision data set {name!r}; choose from {tuple(TORCHVISION_SETS)}, "
                "or use FolderDataModule for your own images"
            )
        super().__init__(
            image_size=image_size,
            batch_size=batch_size,
            crop_scale=crop_scale,
            **common,
        )
        check_fractions(val_fraction=val_fraction)
        self.set_name = self.name = name
        self.dataset = TORCHVISION_SETS[name]
        self.root = Path(root)
        self.val_fraction, self.split_seed = val_fraction, split_seed

    def _make(self, split: str, transform=None, download: bool = False) -> Dataset:
        return self.dataset.make(str(self.root), split, transform, download)

    def prepare_data(self) -> None:
        self._download()
        super().prepare_data()

    def _download(self) -> None:
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
        self._download()  # the class list comes with the data; no-op when already downloaded
        test = self._make("test")
        classes = getattr(test, "classes", None) or range(test.num_classes)  # type: ignore[attr-defined]
        return [str(c) for c in classes]

    def source_splits(self) -> dict[str, Dataset]:
        if "val" in self.dataset.splits:
            return {split: self._make(split) for split in ("train", "val", "test")}
        train = self._make("train")
        tr, va = _split_indices(len(train), [self.val_fraction], self.split_seed)  # type: ignore[arg-type]
        return {"train": Subset(train, tr), "val": Subset(train, va), "test": self._make("test")}
