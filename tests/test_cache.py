"""The input pipeline: the decode-once cache, the loader paths (workers, device) and the batched augmentation."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats
from test_data import _folder, _image

from visionapp.train.cache import DeviceLoader, ImageCache
from visionapp.train.data import DataError, FolderDataModule, LoaderConfig, TorchvisionDataModule, train_cache_size
from visionapp.transforms import TrainPreset


def _module(root: Path, tmp_path: Path, **loader) -> FolderDataModule:
    """A small FolderDataModule; `loader` sets LoaderConfig fields (no workers, the test's cache folder by default)."""
    config = LoaderConfig(**{"num_workers": 0, "cache_dir": str(tmp_path / "cache"), **loader})
    return FolderDataModule(root, val_fraction=0.2, test_fraction=0.2, image_size=24, batch_size=4, loader=config)


def _cache_files(tmp_path: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*") if p.is_file()}


def test_each_split_is_decoded_once_and_again_only_when_the_folder_changes(tmp_path: Path) -> None:
    root = _folder(tmp_path / "pets", n=10)
    dm = _module(root, tmp_path)
    dm.prepare_data()
    built = _cache_files(tmp_path)
    size = train_cache_size(24, (0.35, 1.0))
    assert set(built) == {f"{s}-{px}px.{ext}" for s, px in (("train", size), ("val", 24), ("test", 24))
                          for ext in ("npy", "json")}  # fmt: skip
    assert dm.caches == {} and size == 48  # prepare_data builds the files; setup opens them
    dm.setup("fit")
    assert dm.caches["train"].images.shape == (12, size, size, 3) and len(dm.caches["val"]) == 4
    again = _module(root, tmp_path)
    again.setup("fit")  # the same folder: read, not decoded again
    assert _cache_files(tmp_path) == built
    assert again.split_files("train") == dm.split_files("train")
    _image(root / "dog" / "new.jpg", (0, 200, 0))  # the folder changed: built again, with the new image
    changed = _module(root, tmp_path)
    changed.setup("fit")
    assert _cache_files(tmp_path) != built
    assert sum(len(c) for c in changed.caches.values()) == 21


def test_building_the_cache_leaves_the_random_stream_as_it_was(tmp_path: Path) -> None:
    """A run that builds the cache trains on the same random crops as the same run finding it built."""
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    _module(_folder(tmp_path / "pets", n=10), tmp_path, num_workers=2).setup("fit")  # builds
    assert torch.equal(torch.rand(3), expected)


def test_a_corrupt_image_is_named_and_the_previous_cache_survives(tmp_path: Path) -> None:
    root = _folder(tmp_path / "pets", n=10)
    _module(root, tmp_path).setup("fit")
    built = _cache_files(tmp_path)
    (root / "dog" / "broken.jpg").write_bytes(b"not a JPEG")
    with pytest.raises(DataError, match=r"broken\.jpg cannot be read as an image.*delete or replace"):
        _module(root, tmp_path, num_workers=2).setup("fit")  # the message comes through loader workers whole
    assert set(_cache_files(tmp_path)) == set(built)  # no partial file left, no cache deleted


def test_loader_device_needs_the_cache() -> None:
    with pytest.raises(DataError, match=r"loader.mode=device.*cache"):
        LoaderConfig(mode="device", cache=False)
    with pytest.raises(DataError, match="'gpu' is not one of"):
        LoaderConfig(mode="gpu")  # type: ignore[arg-type]


@pytest.mark.parametrize("loader, cache", [("workers", True), ("device", True), ("workers", False)])
def test_every_path_gives_batches_of_the_same_kind(tmp_path: Path, loader: str, cache: bool) -> None:
    dm = _module(_folder(tmp_path / "pets", n=10), tmp_path, mode=loader, cache=cache)
    dm.setup("fit")
    assert dm.loader_path("train") == loader
    for dl in (dm.train_dataloader(), dm.val_dataloader()):
        x, y = next(iter(dl))
        assert x.shape == (4, 3, 24, 24) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert len(dm.train_dataloader()) == 3  # 12 images, batches of 4, the last partial one dropped if any


def _identity_cache(n: int) -> ImageCache:
    return ImageCache(np.zeros((n, 4, 4, 3), np.uint8), torch.arange(n), Path("unused"))


def test_device_loader_shards_like_the_distributed_sampler() -> None:
    """Under DDP each rank takes its share: every image exactly once per epoch across the ranks, a new order each
    epoch, the same order for the same seed."""
    cache = _identity_cache(64)
    cpu = torch.device("cpu")

    def epoch(rank: int, epoch: int, seed: int = 7) -> list[int]:
        dl = DeviceLoader(cache, batch_size=8, device=cpu, resident=True, shuffle=True, seed=seed, rank=rank,
                          world_size=2)  # fmt: skip
        dl.sampler.set_epoch(epoch)  # what Lightning calls at each epoch's start
        return [int(i) for _, y in dl for i in y]

    ranks = epoch(0, 0), epoch(1, 0)
    assert sorted(ranks[0] + ranks[1]) == list(range(64)) and len(ranks[0]) == len(ranks[1]) == 32
    assert epoch(0, 1) != ranks[0] and epoch(0, 0) == ranks[0] and epoch(0, 0, seed=8) != ranks[0]
    ordered = DeviceLoader(cache, batch_size=8, device=cpu, resident=False, shuffle=False)
    assert [int(i) for _, y in ordered for i in y] == list(range(64))


def _crop_parameters(out: torch.Tensor, side: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scale, log aspect ratio and flip of each crop, read back from outputs of a coordinate image (red = x,
    green = y): the slope of red across the output's middle columns is the crop's width over the output's."""
    s = out.shape[-1]
    mid = slice(s // 4, 3 * s // 4)
    cols = torch.arange(s, dtype=torch.float64)[mid]
    red = out[:, 0, mid, mid].double().mean(1)  # (n, columns)
    green = out[:, 1, mid, mid].double().mean(2)  # (n, rows)
    slope = lambda v: ((v - v.mean(1, keepdim=True)) * (cols - cols.mean())).sum(1) / ((cols - cols.mean()) ** 2).sum()  # noqa: E731
    w, h = slope(red) * s, slope(green) * s
    return (w.abs() * h / side**2).numpy(), torch.log(w.abs() / h).numpy(), (w < 0).numpy()


def test_the_batched_augmentation_draws_from_the_per_image_distribution() -> None:
    """BatchRandomResizedCrop (device path) against TrainPreset.geometry (workers path) on the same image: crop
    scale and aspect ratio have the same distribution (two-sample Kolmogorov-Smirnov), the flip rate the same."""
    side, n = 160, 1500
    ramp = torch.arange(side, dtype=torch.uint8)
    image = torch.stack(
        [ramp.expand(side, side), ramp[:, None].expand(side, side), torch.zeros(side, side, dtype=torch.uint8)]
    )
    preset = TrainPreset(image_size=48, crop_scale=(0.35, 1.0))
    torch.manual_seed(0)
    per_image = torch.stack([preset.geometry(image) for _ in range(n)])
    batched = preset.batch(image.expand(n, -1, -1, -1), torch.Generator().manual_seed(0))
    assert batched.shape == per_image.shape and batched.dtype == torch.uint8
    a, b = _crop_parameters(per_image, side), _crop_parameters(batched, side)
    assert 0.34 < np.median(a[0]) < 0.75 and abs(np.mean(a[1])) < 0.05  # the reading-back measures what it should
    for name, x, y in (("scale", a[0], b[0]), ("log aspect", a[1], b[1])):
        assert stats.ks_2samp(x, y).pvalue > 1e-3, name
    assert all(x.min() > 0.33 and x.max() < 1.02 for x in (a[0], b[0]))
    assert abs(a[1]).max() < math.log(4 / 3) + 0.03 and abs(b[1]).max() < math.log(4 / 3) + 0.03
    flips = a[2].sum(), b[2].sum()
    assert stats.fisher_exact([[flips[0], n - flips[0]], [flips[1], n - flips[1]]]).pvalue > 1e-3
    assert 0.45 < flips[1] / n < 0.55


def test_a_torchvision_set_is_cached_too(tmp_path: Path) -> None:
    """Data sets without files (CIFAR-10's arrays; here `fake`, its shape) are keyed by name, split and items."""
    dm = TorchvisionDataModule(
        "fake", root=str(tmp_path / "tv"), image_size=32, loader=LoaderConfig(num_workers=0), batch_size=16
    )
    dm.prepare_data()
    dm.setup("fit")
    assert {k: len(c) for k, c in dm.caches.items()} == {"train": 180, "val": 20, "test": 50}
    assert dm.caches["train"].images.shape[1:] == (56, 56, 3)  # 32 px / sqrt(0.35), rounded up to a multiple of 8
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3, 32, 32) and y.max() < 10
    assert dm.split_files("train") == []  # no files to record


@pytest.mark.gpu
def test_on_a_gpu_the_cache_is_served_from_device_memory_or_pinned_memory_alike(tmp_path: Path) -> None:
    """The two GPU paths (resident, and staged through pinned memory when the cache does not fit) give the same
    batches: eval ones equal to the CPU's bit for bit, train ones equal to each other for the same seed."""
    dm = _module(_folder(tmp_path / "pets", n=20), tmp_path)
    dm.setup("fit")
    cuda = torch.device("cuda")
    cpu_val = torch.cat([x for x, _ in DeviceLoader(dm.caches["val"], batch_size=4, device=torch.device("cpu"),
                                                     resident=True, shuffle=False)])  # fmt: skip
    for split, augment in (("val", None), ("train", dm.train_preset.batch)):
        runs = [
            torch.cat([x.cpu() for x, _ in DeviceLoader(dm.caches[split], batch_size=4, device=cuda, resident=r,
                                                        shuffle=split == "train", augment=augment, seed=3)])
            for r in (True, False)
        ]  # fmt: skip
        assert torch.equal(runs[0], runs[1]), split
        if split == "val":
            assert torch.equal(runs[0], cpu_val)
