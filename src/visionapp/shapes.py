"""The `shapes` data set: generated, seeded, with a ground-truth mask per image.

    python -m visionapp.shapes --root data/shapes        # (the DataModule calls this for you)

Every image holds one class shape (circle, square, triangle, star, cross) on a textured background
among clutter (lines, arcs, specks) that is no class's shape. Colour, background, texture, size,
position and rotation are drawn independently of the class, and every shape is scaled to the same
area, so no colour or pixel-count statistic gives the class away: a model has to see the outline.

Layout (an ImageFolder tree plus a parallel mask tree, which explain/ reads):
    <root>/{train,val,test}/<class>/<index>.png      RGB images
    <root>/masks/{train,val,test}/<class>/<index>.png  L masks, 255 inside the class shape
    <root>/shapes.json                                 the parameters that made it
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from rich.progress import track

CLASSES = ("circle", "cross", "square", "star", "triangle")
SPLITS = ("train", "val", "test")
SUPERSAMPLE = 4  # draw at 4x and downsample: anti-aliased edges, so outlines are not pixel-exact giveaways


def _polygon(name: str) -> np.ndarray:
    """Unit-ish outline of a class shape as (N, 2) vertices around the origin."""
    if name == "circle":
        t = np.linspace(0, 2 * np.pi, 96, endpoint=False)
    elif name == "square":
        t = np.linspace(0, 2 * np.pi, 4, endpoint=False) + np.pi / 4
    elif name == "triangle":
        t = np.linspace(0, 2 * np.pi, 3, endpoint=False) + np.pi / 2
    elif name == "star":
        t = np.linspace(0, 2 * np.pi, 10, endpoint=False) + np.pi / 2
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)
    elif name == "cross":
        a, b = 1.0, 0.3  # arm length, half arm width
        pts = [
            (b, b),
            (b, a),
            (-b, a),
            (-b, b),
            (-a, b),
            (-a, -b),
            (-b, -b),
            (-b, -a),
            (b, -a),
            (b, -b),
            (a, -b),
            (a, b),
        ]
        return np.array(pts, dtype=float)
    else:
        raise ValueError(f"unknown shape {name!r}; choose from {CLASSES}")
    return np.stack([np.cos(t), np.sin(t)], axis=1)


def _area(poly: np.ndarray) -> float:
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


# Every outline scaled to unit area, so that a shape's pixel count says nothing about its class.
_UNIT_SHAPES = {name: (p := _polygon(name)) / math.sqrt(_area(p)) for name in CLASSES}


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, size=3)


def _luma(c: np.ndarray) -> float:
    return float(0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2])


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A textured background (H, W, 3) float array and its mean colour."""
    base, other = _colour(rng), _colour(rng)
    yy, xx = np.mgrid[0:size, 0:size] / size
    kind = rng.integers(4)
    if kind == 0:  # noise
        w = rng.uniform(0, 1, size=(size, size))
    elif kind == 1:  # stripes at a random angle and frequency
        ang, freq = rng.uniform(0, np.pi), rng.uniform(2, 8)
        w = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (xx * np.cos(ang) + yy * np.sin(ang)))
    elif kind == 2:  # checker
        n = rng.integers(3, 9)
        w = ((np.floor(xx * n) + np.floor(yy * n)) % 2).astype(float)
    else:  # linear gradient
        ang = rng.uniform(0, 2 * np.pi)
        w = xx * np.cos(ang) + yy * np.sin(ang)
        w = (w - w.min()) / (np.ptp(w) + 1e-9)
    w *= rng.uniform(0.05, 0.3)  # texture contrast, kept well below the shape's contrast
    img = base[None, None, :] * (1 - w[..., None]) + other[None, None, :] * w[..., None]
    return img, img.reshape(-1, 3).mean(0)


def render(index: int, split: str, *, seed: int, size: int) -> tuple[Image.Image, Image.Image, int]:
    """Image, mask and label of sample `index` of `split`; the same arguments always give the same pixels."""
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    label = index % len(CLASSES)  # balanced classes; everything else below is drawn independently of it
    big = size * SUPERSAMPLE
    bg, bg_mean = _background(rng, size)
    img = Image.fromarray(bg.astype(np.uint8)).resize((big, big), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(img)

    # Clutter: line segments, arcs and specks, none of them a class shape.
    for _ in range(rng.integers(2, 7)):
        c = tuple(int(v) for v in _colour(rng))
        kind = rng.integers(3)
        x0, y0 = rng.uniform(0, big, size=2)
        if kind == 0:
            x1, y1 = rng.uniform(0, big, size=2)
            draw.line([(x0, y0), (x1, y1)], fill=c, width=int(rng.integers(1, 3) * SUPERSAMPLE))
        elif kind == 1:
            r = rng.uniform(0.05, 0.2) * big
            start = rng.uniform(0, 360)
            draw.arc([x0 - r, y0 - r, x0 + r, y0 + r], start, start + rng.uniform(30, 150), fill=c, width=SUPERSAMPLE)
        else:
            r = rng.uniform(0.5, 1.5) * SUPERSAMPLE
            draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=c)

    # The class shape: random area, position, rotation and a colour that contrasts with the background.
    side = rng.uniform(0.3, 0.45) * big  # sqrt of the area in pixels
    angle = rng.uniform(0, 2 * np.pi)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    pts = _UNIT_SHAPES[CLASSES[label]] @ rot.T * side
    margin = np.abs(pts).max(axis=0)
    centre = rng.uniform(margin, big - margin)
    pts = [tuple(p) for p in pts + centre]
    fill = _colour(rng)
    while abs(_luma(fill) - _luma(bg_mean)) < 80:  # keep the outline visible; colour itself stays uninformative
        fill = _colour(rng)
    draw.polygon(pts, fill=tuple(int(v) for v in fill))
    mask = Image.new("L", (big, big), 0)
    ImageDraw.Draw(mask).polygon(pts, fill=255)

    img = img.resize((size, size), Image.Resampling.BOX)
    mask = mask.resize((size, size), Image.Resampling.BOX).point(lambda v: 255 if v >= 128 else 0)
    return img, mask, label


def _write(job: tuple[Path, str, int, int, int]) -> None:
    root, split, index, seed, size = job
    img, mask, label = render(index, split, seed=seed, size=size)
    name = f"{CLASSES[label]}/{index:05d}.png"
    img.save(root / split / name)
    mask.save(root / "masks" / split / name)


def generate(
    root: str | Path, *, seed: int = 0, size: int = 96, counts: dict[str, int] | None = None, workers: int = 2
) -> Path:
    """Write the data set under `root` unless an identical one is already there.

    Written to a temporary folder and renamed at the end, so an interrupted run leaves no half data set.
    """
    root = Path(root)
    counts = counts or {"train": 3000, "val": 500, "test": 1000}
    params = {"seed": seed, "size": size, "counts": counts, "classes": list(CLASSES), "version": 2}
    meta = root / "shapes.json"
    if meta.exists() and json.loads(meta.read_text()) == params:
        return root
    if root.is_dir() and any(root.iterdir()) and not meta.exists():
        # Not a shapes data set (no shapes.json): maybe the user's own folder, given as the root by mistake.
        raise FileExistsError(
            f"{root} is not empty and holds no shapes data set (no shapes.json); nothing was changed. "
            "Point the shapes root at an empty or new folder (e.g. data/shapes), or use FolderDataModule "
            "(configs/folder.yaml) for your own images"
        )
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for split in SPLITS:
        for c in CLASSES:
            (tmp / split / c).mkdir(parents=True)
            (tmp / "masks" / split / c).mkdir(parents=True)
    jobs = [(tmp, split, i, seed, size) for split in SPLITS for i in range(counts[split])]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for _ in track(pool.map(_write, jobs, chunksize=64), total=len(jobs), description=f"Generating {root}"):
            pass
    (tmp / "shapes.json").write_text(json.dumps(params, indent=2))
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    return root


def mask_path(image_path: str | Path) -> Path | None:
    """The ground-truth mask of a shapes image (…/<split>/<class>/<i>.png), or None for other data."""
    p = Path(image_path)
    candidate = p.parents[2] / "masks" / p.parents[1].name / p.parent.name / p.name
    return candidate if candidate.exists() else None


def write_photo_folder(root: str | Path, *, per_class: dict[str, int] | None = None, seed: int = 7) -> Path:
    """A folder laid out and encoded as a user's photos, to try the folder configuration without any:
    root/train|val/{circle,star}/IMG_nnnn.jpg at varied sizes and aspect ratios, some stored sideways with an
    EXIF orientation tag (as cameras do), one grayscale and one CMYK JPEG per class and split."""
    root = Path(root)
    per_class = per_class or {"train": 12, "val": 6}
    sizes = [(160, 120), (96, 128), (200, 200), (150, 90), (120, 160)]
    for split, n in per_class.items():
        for c, name in ((0, "circle"), (3, "star")):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img, _, _ = render(i * len(CLASSES) + c, split if split in SPLITS else "train", seed=seed, size=200)
                img = img.resize(sizes[i % len(sizes)])
                path = folder / f"IMG_{i:04d}.jpg"
                if i == 1:
                    img.convert("L").save(path, quality=90)
                elif i == 2:
                    img.convert("CMYK").save(path, quality=90)
                elif i % 4 == 3:  # pixels stored rotated; EXIF orientation 6 says "rotate 90° clockwise to view"
                    exif = Image.Exif()
                    exif[0x0112] = 6
                    img.transpose(Image.Transpose.ROTATE_90).save(path, quality=90, exif=exif)
                else:
                    img.save(path, quality=90)
    return root


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="data/shapes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--photos", type=int, default=0, help="instead: a photo-like JPEG folder, N train images a class")
    args = ap.parse_args()
    if args.photos:
        counts = {"train": args.photos, "val": max(2, args.photos // 3)}
        print(write_photo_folder(args.root, per_class=counts))
    else:
        print(generate(args.root, seed=args.seed, size=args.size))
