"""Decode once: each split's images as one uint8 array (N, S, S, 3) on disk, memory-mapped by every later epoch,
run and loader worker, and the loader that serves batches from it on the training device.

    <root>.cache/<data set>-<root hash>/<split>-<S>px.npy    the pixels (numpy's .npy, np.load(mmap_mode="r"))
    <root>.cache/<data set>-<root hash>/<split>-<S>px.json   files, labels, the fingerprint that built it
(beside the data folder by default; the DataModule's cache_dir puts them elsewhere).

The train split is stored whole, resized to a square of S = image_size / sqrt(min crop scale) (so that even
the smallest crop keeps about image_size pixels across), and cropped at random every epoch; val and test are
stored as EvalPreset's output, so their batches are the bundle's preprocessing bit for bit. A changed folder
(files added, removed or modified) changes the fingerprint and the cache is built again; an image that cannot
be decoded is named. Pixels are stored channels-last (each pixel's RGB together, as in an image file): torch's
uint8 resize runs faster on that layout than on planar channels (docs/performance.md);
`ImageCache.tensor` hands out the usual (…, 3, S, S) views of it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import track
from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler, Subset

FORMAT = 1  # bump when what a cache holds changes: older caches are then rebuilt


class DecodeError(ValueError):
    """An image of the split could not be decoded; the message names it."""


def source_files(ds: Dataset) -> list[str] | None:
    """The image file behind each item of an ImageFolder (or a Subset of one), in item order; None otherwise."""
    if isinstance(ds, Subset):
        files = source_files(ds.dataset)
        return None if files is None else [files[i] for i in ds.indices]
    if isinstance(ds, ConcatDataset):
        parts = [source_files(d) for d in ds.datasets]
        return None if any(p is None for p in parts) else [f for p in parts for f in p or ()]
    samples = getattr(ds, "samples", None)  # an ImageFolder's (path, label) list; data.Images has one too
    return None if samples is None else [str(path) for path, _ in samples]


def fingerprint(key: dict[str, Any], files: list[str] | None) -> str:
    """What the cache was built from: its key (split, size, geometry, data set) and each file's path, size and
    modification time, so any change to the folder shows."""
    h = hashlib.sha256(json.dumps(key, sort_keys=True).encode())
    for f in files or ():
        st = os.stat(f)
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


@dataclass
class ImageCache:
    """A split decoded once: `images` (N, S, S, 3) uint8, memory-mapped; `labels` (N,) int64."""

    images: np.ndarray
    labels: torch.Tensor
    path: Path

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def nbytes(self) -> int:
        return int(self.images.nbytes)

    def tensor(self, indices: Any = slice(None)) -> torch.Tensor:
        """Images as a tensor of their own (copied out of the memory map): (3, S, S) for an index, (n, 3, S, S) for
        several, in channels-last memory format."""
        return channels_first_view(torch.from_numpy(np.array(self.images[indices])))  # a copy: the map is read-only


def channels_first_view(hwc: torch.Tensor) -> torch.Tensor:
    """(…, H, W, 3) → (…, 3, H, W) without moving a byte (channels-last strides)."""
    return hwc.movedim(-1, -3)


class _Decoded(Dataset):
    """Items of `source` with `geometry` applied, as (image, label, error): a decode failure comes back as the
    error naming the file (not as an exception, which the loader would wrap in a worker's traceback)."""

    def __init__(self, source: Dataset, geometry: Callable, size: int, files: list[str] | None) -> None:
        self.source, self.geometry, self.size, self.files = source, geometry, size, files

    def __len__(self) -> int:
        return len(self.source)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]:
        try:
            image, label = self.source[i]
        except Exception as e:
            where = self.files[i] if self.files else f"item {i}"
            return (
                torch.zeros(3, self.size, self.size, dtype=torch.uint8),
                -1,
                f"{where} cannot be read as an image ({type(e).__name__}: {e})",
            )
        return torch.as_tensor(self.geometry(image)), int(label), ""


def open_or_build(
    path: Path, source: Dataset, geometry: Callable, size: int, key: dict[str, Any], *, workers: int
) -> ImageCache:
    """The cache at `path` (…/<split>-<size>px) if it was built from this very data, else built now.

    Written under temporary names and renamed when complete: an interrupted build leaves the old cache or
    none, never half of one.
    """
    files = source_files(source)
    key = {**key, "format": FORMAT, "size": size, "items": len(source)}  # type: ignore[arg-type]
    if isinstance(source, Subset):  # a seeded share of a data set: which items it holds
        key["indices"] = hashlib.sha256(str(list(source.indices)).encode()).hexdigest()
    fp = fingerprint(key, files)
    npy, meta = path.with_suffix(".npy"), path.with_suffix(".json")
    if meta.is_file() and npy.is_file():
        info = json.loads(meta.read_text())
        if info.get("fingerprint") == fp:
            return ImageCache(np.load(npy, mmap_mode="r"), torch.tensor(info["labels"]), path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_npy, tmp_meta = (p.with_name(f".{p.name}.{os.getpid()}.partial") for p in (npy, meta))
    try:
        images = np.lib.format.open_memmap(tmp_npy, mode="w+", dtype=np.uint8, shape=(len(source), size, size, 3))  # type: ignore[arg-type]
        labels: list[int] = []
        loader = DataLoader(_Decoded(source, geometry, size, files), batch_size=64, num_workers=workers)
        # fork_rng: the loader draws its workers' seeds from the global generator; without it a run that builds
        # the cache would train on other random crops than the same run finding it built.
        with torch.random.fork_rng(devices=[]):
            for x, y, errors in track(loader, description=f"Decoding once into {npy}"):
                if any(errors):
                    raise DecodeError(next(e for e in errors if e))
                images[len(labels) : len(labels) + len(y)] = x.movedim(1, -1).numpy()
                labels += y.tolist()
        images.flush()
        del images
        tmp_meta.write_text(json.dumps({"fingerprint": fp, "key": key, "files": files, "labels": labels}))
        os.replace(tmp_npy, npy)
        os.replace(tmp_meta, meta)
    finally:
        tmp_npy.unlink(missing_ok=True)
        tmp_meta.unlink(missing_ok=True)
    return ImageCache(np.load(npy, mmap_mode="r"), torch.tensor(labels), path)


class CachedSplit(Dataset):
    """A cached split for DataLoader workers: each image read from the memory map, then `transform` (the train
    augmentation) or nothing (val/test: already the eval geometry)."""

    def __init__(self, cache: ImageCache, transform: Callable | None = None) -> None:
        self.cache, self.transform = cache, transform

    def __len__(self) -> int:
        return len(self.cache)

    def _item(self, x: torch.Tensor) -> torch.Tensor:
        # Planar again once cropped (a copy of the output only): batches leave in the layout they always had.
        return (self.transform(x) if self.transform else x).contiguous()

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self._item(self.cache.tensor(i)), int(self.cache.labels[i])

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        # A batch's images in one read from the memory map (DataLoader asks for whole batches this way).
        images = self.cache.tensor(indices)
        labels = self.cache.labels[indices].tolist()
        return [(self._item(x), y) for x, y in zip(images, labels, strict=True)]


class DeviceLoader:
    """Batches of a cached split made on the training device, no DataLoader worker involved.

    The images live on the device when `resident` (they fit), else in the memory map, gathered per batch into
    pinned host memory and copied asynchronously. `augment(batch, generator)` (the train split's
    BatchRandomResizedCrop) runs on the whole batch on the device. Indices come from a DistributedSampler, so
    under DDP every rank takes its share and every image is seen once per epoch across ranks (Lightning calls
    `sampler.set_epoch` each epoch).
    """

    batch_sampler = None  # what Lightning inspects on any loader: batches come from `sampler` and batch_size

    def __init__(
        self,
        cache: ImageCache,
        *,
        batch_size: int,
        device: torch.device,
        resident: bool,
        shuffle: bool,
        augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.cache, self.batch_size, self.device, self.augment = cache, batch_size, device, augment
        self.drop_last = shuffle and len(cache) // world_size > batch_size  # no 1-sample BatchNorm batch
        self.sampler: DistributedSampler[int] = DistributedSampler(
            CachedSplit(cache), world_size, rank, shuffle=shuffle, seed=seed
        )
        self.generator = torch.Generator(device).manual_seed(seed * 1000 + rank)
        self.images = cache.tensor().to(device) if resident else None
        self.labels = cache.labels.to(device)
        # Not resident on a GPU: two pinned staging buffers, one filled while the other's copy is in flight.
        shape = (batch_size, *cache.images.shape[1:])
        staged = device.type == "cuda" and not resident
        self._staging = [torch.empty(shape, dtype=torch.uint8, pin_memory=True) for _ in range(2)] if staged else []
        self._copied = [torch.cuda.Event() for _ in range(2)] if staged else []

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _gather(self, idx: torch.Tensor, step: int) -> torch.Tensor:
        if self.images is not None:
            return self.images[idx.to(self.device)]
        if not self._staging:  # CPU: straight from the memory map
            return self.cache.tensor(idx.numpy())
        buf, copied = self._staging[step % 2][: len(idx)], self._copied[step % 2]
        copied.synchronize()  # this buffer's copy of two batches ago has left it
        np.take(self.cache.images, idx.numpy(), axis=0, out=buf.numpy())
        x = buf.to(self.device, non_blocking=True)
        copied.record()
        return channels_first_view(x)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.tensor(list(iter(self.sampler)))
        for step in range(len(self)):
            idx = order[step * self.batch_size : (step + 1) * self.batch_size]
            x = self._gather(idx, step)
            if self.augment is not None:
                x = self.augment(x, self.generator)
            yield x, self.labels[idx.to(self.device)]
