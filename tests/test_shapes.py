import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visionapp import shapes


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.png")):
        h.update(f.relative_to(root).as_posix().encode() + f.read_bytes())
    return h.hexdigest()


def test_generation_is_deterministic(tmp_path: Path) -> None:
    counts = {"train": 20, "val": 5, "test": 5}
    a = shapes.generate(tmp_path / "a", seed=3, size=64, counts=counts, workers=1)
    b = shapes.generate(tmp_path / "b", seed=3, size=64, counts=counts, workers=2)
    c = shapes.generate(tmp_path / "c", seed=4, size=64, counts=counts, workers=1)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)
    assert json.loads((a / "shapes.json").read_text())["seed"] == 3
    assert not (tmp_path / "a.partial").exists()


def test_layout_classes_and_masks(tmp_path: Path) -> None:
    root = shapes.generate(tmp_path / "s", seed=0, size=96, counts={"train": 50, "val": 10, "test": 10})
    assert len(shapes.CLASSES) >= 5
    for split, n in (("train", 50), ("val", 10), ("test", 10)):
        per_class = [len(list((root / split / c).glob("*.png"))) for c in shapes.CLASSES]
        assert sum(per_class) == n and max(per_class) - min(per_class) <= 1  # balanced
    for img_path in (root / "train").rglob("*.png"):
        img = Image.open(img_path)
        mask = np.asarray(Image.open(shapes.mask_path(img_path)))
        assert img.size == (96, 96) and img.mode == "RGB"
        assert set(np.unique(mask)) <= {0, 255}
        assert 0.03 < (mask > 0).mean() < 0.5  # a shape, not the whole image


def _stats(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    feats, labels, areas = [], [], []
    for k, c in enumerate(shapes.CLASSES):
        for f in sorted((root / "train" / c).glob("*.png")):
            a = np.asarray(Image.open(f), dtype=float) / 255
            feats.append(np.concatenate([a.mean((0, 1)), a.std((0, 1))]))
            labels.append(k)
            areas.append((np.asarray(Image.open(shapes.mask_path(f))) > 0).mean())
    return np.array(feats), np.array(labels), np.array(areas)


def test_no_colour_statistic_gives_the_class_away(tmp_path: Path) -> None:
    root = shapes.generate(tmp_path / "s", seed=1, size=64, counts={"train": 1000, "val": 5, "test": 5})
    x, y, areas = _stats(root)
    # Nearest class centroid on per-image colour mean and spread, fitted on half, scored on the other half.
    half = len(y) // 2
    idx = np.random.default_rng(0).permutation(len(y))
    fit, held = idx[:half], idx[half:]
    centroids = np.stack([x[fit][y[fit] == k].mean(0) for k in range(len(shapes.CLASSES))])
    pred = np.argmin(((x[held, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
    chance = 1 / len(shapes.CLASSES)
    assert (pred == y[held]).mean() < chance + 0.07
    # Shape area is the same in distribution for every class, so pixel counts do not tell either.
    means = [areas[y == k].mean() for k in range(len(shapes.CLASSES))]
    assert max(means) / min(means) < 1.15


@pytest.mark.parametrize("name", shapes.CLASSES)
def test_every_outline_has_unit_area(name: str) -> None:
    assert shapes._area(shapes._UNIT_SHAPES[name]) == pytest.approx(1.0)


def test_a_folder_that_is_not_a_shapes_data_set_is_left_alone(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"no shapes\.json"):
        shapes.generate(photos, size=16, counts={"train": 5, "val": 5, "test": 5}, workers=1)
    assert [p.name for p in photos.iterdir()] == ["notes.txt"]
    shapes.generate(tmp_path / "new", size=16, counts={"train": 5, "val": 5, "test": 5}, workers=1)
    shapes.generate(tmp_path / "new", size=16, counts={"train": 10, "val": 5, "test": 5}, workers=1)  # ours: remade
    assert len(list((tmp_path / "new" / "train").rglob("*.png"))) == 10
