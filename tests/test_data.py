"""Bad data gets an error naming the file or folder and the fix, before any DataLoader worker runs."""

from pathlib import Path

import pytest
import torch
from PIL import Image

from visionapp import shapes
from visionapp.decode import load_image
from visionapp.train.data import DataError, FolderDataModule, LoaderConfig, ShapesDataModule, TorchvisionDataModule
from visionapp.transforms import EvalPreset

NO_WORKERS = LoaderConfig(num_workers=0)


def _image(path: Path, colour: tuple[int, int, int] = (200, 10, 10)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), colour).save(path)


def _folder(root: Path, classes: tuple[str, ...] = ("cat", "dog"), n: int = 6) -> Path:
    for c in classes:
        for i in range(n):
            _image(root / c / f"{i}.jpg", (i * 40, 0, 0))
    return root


def test_single_folder_is_split_by_seeded_fractions(tmp_path: Path) -> None:
    dm = FolderDataModule(
        _folder(tmp_path / "pets", n=10), val_fraction=0.2, test_fraction=0.1, image_size=32, loader=NO_WORKERS
    )
    assert dm.class_names == ["cat", "dog"]
    dm.setup("fit")
    sizes = {k: len(v) for k, v in dm.splits.items()}
    assert sizes == {"train": 14, "val": 4, "test": 2}
    batch = next(iter(dm.train_dataloader()))
    assert batch[0].shape[1:] == (3, 32, 32) and batch[0].dtype == torch.uint8  # workers ship uint8 ...
    x, _y = dm.on_after_batch_transfer(batch)
    assert x.shape[1:] == (3, 32, 32) and x.dtype == torch.float32  # ... normalised on the batch's device
    dm2 = FolderDataModule(tmp_path / "pets", val_fraction=0.2, test_fraction=0.1, image_size=32)
    dm2.setup("fit")
    assert dm2.split_files("val") == dm.split_files("val")


def test_train_val_layout(tmp_path: Path) -> None:
    _folder(tmp_path / "d" / "train")
    _folder(tmp_path / "d" / "val", n=2)
    dm = FolderDataModule(tmp_path / "d", image_size=32)
    dm.setup("fit")
    # no test/: 15% of train (2 of 12) held out as the test split, never the validation split that picked the model
    assert len(dm.splits["train"]) == 10 and len(dm.splits["val"]) == 4 and len(dm.splits["test"]) == 2


def test_corrupt_image_is_named(tmp_path: Path) -> None:
    root = _folder(tmp_path / "d")
    (root / "dog" / "broken.jpg").write_text("this is not a JPEG")
    with pytest.raises(DataError, match=r"broken\.jpg cannot be read as an image.*delete or replace"):
        FolderDataModule(root).setup("fit")


def test_non_image_file_is_named(tmp_path: Path) -> None:
    root = _folder(tmp_path / "d")
    (root / "cat" / "notes.txt").write_text("labels?")
    with pytest.raises(DataError, match=r"notes\.txt is not an image file.*remove it"):
        FolderDataModule(root).setup("fit")


def test_empty_class_folder_is_named(tmp_path: Path) -> None:
    root = _folder(tmp_path / "d")
    (root / "bird").mkdir()
    with pytest.raises(DataError, match=r"class folder .*bird has no images"):
        FolderDataModule(root).setup("fit")


def test_missing_split_is_named(tmp_path: Path) -> None:
    _folder(tmp_path / "d" / "train")
    with pytest.raises(DataError, match=r"val does not.*add a val/<class>/ split"):
        FolderDataModule(tmp_path / "d").setup("fit")


def test_mismatched_classes_between_splits(tmp_path: Path) -> None:
    _folder(tmp_path / "d" / "train")
    _folder(tmp_path / "d" / "val", classes=("cat", "fox"))
    with pytest.raises(DataError, match="same class folders"):
        FolderDataModule(tmp_path / "d").setup("fit")


def test_missing_root_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nowhere does not exist"):
        _ = FolderDataModule(tmp_path / "nowhere").class_names


def test_torchvision_set_offline_says_so_and_points_to_folder(tmp_path: Path, offline: None) -> None:
    dm = TorchvisionDataModule("cifar10", root=str(tmp_path / "tv"))
    with pytest.raises(DataError, match=r"could not download cifar10.*offline.*FolderDataModule"):
        dm.prepare_data()


def test_unknown_torchvision_set_lists_valid_ones() -> None:
    with pytest.raises(DataError, match="flowers102"):
        TorchvisionDataModule("imagenet")


def test_shapes_module_generates_once(tmp_path: Path) -> None:
    dm = ShapesDataModule(tmp_path / "s", num_train=10, num_val=5, num_test=5, image_size=48, loader=NO_WORKERS)
    dm.prepare_data()
    stamp = (tmp_path / "s" / "shapes.json").stat().st_mtime_ns
    dm.prepare_data()
    assert (tmp_path / "s" / "shapes.json").stat().st_mtime_ns == stamp
    dm.setup("fit")
    outliers = len(shapes.OUTLIER_KINDS)  # one image of each kind at this size, labelled -1 (outlier exposure)
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 10 + outliers, "val": 5, "test": 5}
    assert [dm.splits["train"][i][1] for i in range(10, 10 + outliers)] == [-1] * outliers
    assert set(dm.ood_sets()) == {"near", "far"}  # measured only: never in a split


@pytest.mark.parametrize("loader, cache", [("workers", True), ("device", True), ("workers", False)])
def test_eval_batches_equal_the_bundles_preprocessing(tmp_path: Path, loader: str, cache: bool) -> None:
    """Loader (uint8) + on-device normalisation gives exactly what EvalPreset, used by explain/ and serve/,
    gives for the same files: one preprocessing, split between the loader (or the cache) and the device."""
    dm = FolderDataModule(_folder(tmp_path / "d", n=6), val_fraction=0.5, test_fraction=0.2, image_size=24,
                          batch_size=4, loader=LoaderConfig(mode=loader, num_workers=0, cache=cache))  # type: ignore[arg-type]  # fmt: skip
    dm.setup("fit")
    x, _ = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())))
    files = dm.split_files("val")[:4]
    preset = EvalPreset(image_size=24)
    torch.testing.assert_close(x, torch.stack([preset(load_image(f)) for f in files]), rtol=0, atol=0)


@pytest.mark.parametrize(
    "fractions, message",
    [((0.6, 0.6), "sum must be below 1"), ((-0.1, 0.2), "must be in"), ((0.2, 1.0), "must be in")],
)
def test_split_fractions_that_overlap_are_refused(tmp_path: Path, fractions: tuple[float, float], message: str) -> None:
    with pytest.raises(DataError, match=message):
        FolderDataModule(_folder(tmp_path / "pets"), val_fraction=fractions[0], test_fraction=fractions[1])


def test_a_split_left_empty_is_named(tmp_path: Path) -> None:
    dm = FolderDataModule(_folder(tmp_path / "pets", n=2), val_fraction=0.1, test_fraction=0.1, image_size=32)
    with pytest.raises(DataError, match=r"split of .* is empty"):
        dm.setup("fit")


@pytest.mark.parametrize("layout", ["one folder", "train and val folders"])
def test_no_image_is_in_two_splits(tmp_path: Path, layout: str) -> None:
    root = tmp_path / "pets"
    if layout == "one folder":
        _folder(root, n=20)
    else:
        _folder(root / "train", n=20)
        _folder(root / "val", n=5)
    dm = FolderDataModule(root, val_fraction=0.2, test_fraction=0.2, image_size=32, loader=NO_WORKERS)
    dm.setup("fit")
    files = {split: dm.split_files(split) for split in ("train", "val", "test")}
    assert all(files.values())
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not set(files[a]) & set(files[b]), (a, b)
    if layout != "one folder":  # no root/test: the test split is held out of train, not the validation split
        assert all("/train/" in f for f in files["test"]) and len(files["test"]) == 8
