"""The `shapes` data set: generated, seeded, with a ground-truth mask per image.

    python -m visionapp.shapes --root data/shapes        # (the DataModule calls this for you)

Every image holds one class shape (circle, square, triangle, star, cross) on a textured background
among clutter (lines, arcs, specks) that is no class's shape. Colour, background, texture, size,
position and rotation are drawn independently of the class, and every shape is scaled to the same
area, so no colour or pixel-count statistic gives the class away: a model has to see the outline.

Beside the classes, images that are none of them, for out-of-distribution scores (visionapp.ood). Two groups that
never share a kind: outliers that training pushes towards a uniform prediction (outlier exposure: other shapes in
the same style, irregular polygons and blobs, clutter without a shape, class images scrambled or blurred), and the
sets that measure it:
`near`, held-out shapes drawn in the classes' style, and `far`, images of another kind.

Layout (an ImageFolder tree plus a parallel mask tree, which explain/ reads):
    <root>/{train,val,test}/<class>/<index>.png      RGB images
    <root>/masks/{train,val,test}/<class>/<index>.png  L masks, 255 inside the class shape
    <root>/outliers/{train,val}/<kind>/<index>.png     training outliers (OUTLIER_KINDS)
    <root>/ood/near/<kind>/<index>.png                 measured only: held-out shapes (NEAR_KINDS)
    <root>/ood/far/<kind>/<index>.png                  measured only: other kinds of image (FAR_KINDS)
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
from PIL import Image, ImageDraw, ImageFilter
from rich.progress import track

CLASSES = ("circle", "cross", "square", "star", "triangle")
SPLITS = ("train", "val", "test")
# None of the classes. Training sees OUTLIER_KINDS only; NEAR_KINDS and FAR_KINDS only measure.
OUTLIER_KINDS = ("rectangle", "rhombus", "crescent", "heart", "polygon", "blob", "clutter", "scrambled", "blurred")
NEAR_KINDS = ("hexagon", "ellipse", "pentagon", "arrow")
FAR_KINDS = ("noise", "plasma", "blocks")
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
        quarter = np.array([(b, b), (b, a), (-b, a)])  # one arm; the others are it turned by 90° steps
        turn = np.array([[0.0, -1.0], [1.0, 0.0]])
        return np.concatenate([quarter @ np.linalg.matrix_power(turn, k).T for k in range(4)])
    elif name in ("hexagon", "pentagon"):
        n = 6 if name == "hexagon" else 5
        t = np.linspace(0, 2 * np.pi, n, endpoint=False) + np.pi / 2
    elif name == "ellipse":
        t = np.linspace(0, 2 * np.pi, 96, endpoint=False)
        return np.stack([np.cos(t), 0.5 * np.sin(t)], axis=1)
    elif name == "arrow":
        return np.array([(-1, -0.25), (0.2, -0.25), (0.2, -0.6), (1, 0), (0.2, 0.6), (0.2, 0.25), (-1, 0.25)], float)
    elif name == "rectangle":
        return np.array([(1, 0.45), (-1, 0.45), (-1, -0.45), (1, -0.45)], dtype=float)
    elif name == "rhombus":
        return np.array([(1, 0), (0, 0.55), (-1, 0), (0, -0.55)], dtype=float)
    elif name == "heart":
        t = np.linspace(0, 2 * np.pi, 96, endpoint=False)
        x, y = 16 * np.sin(t) ** 3, 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
        return np.stack([x, y], axis=1) / 16
    elif name == "crescent":  # the unit disc less a disc of radius 0.85 centred at (0.5, 0)
        a, b = np.arctan2(0.85, 0.5275), np.arctan2(0.85, 0.0275)  # where the two circles cross
        outer = np.linspace(a, 2 * np.pi - a, 64)
        inner = np.linspace(2 * np.pi - b, b, 64)
        return np.concatenate([np.stack([np.cos(outer), np.sin(outer)], 1),
                               np.stack([0.5 + 0.85 * np.cos(inner), 0.85 * np.sin(inner)], 1)])  # fmt: skip
    else:
        raise ValueError(f"unknown shape {name!r}; choose from {CLASSES}")
    return np.stack([np.cos(t), np.sin(t)], axis=1)


def _area(poly: np.ndarray) -> float:
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


# Every outline scaled to unit area, so that a shape's pixel count says nothing about its class.
RANDOM_OUTLINES = ("polygon", "blob")  # a new outline every image (_random_outline)
DRAWN = (*CLASSES, *(k for k in (*OUTLIER_KINDS, *NEAR_KINDS) if k not in ("clutter", "scrambled", "blurred",
                                                                          *RANDOM_OUTLINES)))  # fmt: skip


def _random_outline(kind: str, rng: np.random.Generator) -> np.ndarray:
    """An irregular polygon (5-9 vertices at jittered angles and radii) or a smooth blob (a random Fourier radius),
    scaled to unit area like the classes' outlines."""
    if kind == "polygon":
        n = int(rng.integers(5, 10))
        t = np.sort(rng.uniform(0, 2 * np.pi, n))
        r = rng.uniform(0.55, 1.0, n)
    else:
        t = np.linspace(0, 2 * np.pi, 96, endpoint=False)
        r = np.ones_like(t)
        for k in range(2, 6):
            r += rng.uniform(0, 0.25) * np.cos(k * t + rng.uniform(0, 2 * np.pi))
    poly = np.stack([r * np.cos(t), r * np.sin(t)], axis=1)
    return poly / math.sqrt(_area(poly))


_UNIT_SHAPES = {name: (p := _polygon(name)) / math.sqrt(_area(p)) for name in DRAWN}


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


def _draw_clutter(draw: ImageDraw.ImageDraw, rng: np.random.Generator, big: int) -> None:
    """Line segments, arcs and specks, none of them a class shape."""
    for _ in range(rng.integers(2, 7)):
        c = tuple(int(v) for v in _colour(rng))
        stroke = rng.integers(3)
        x0, y0 = rng.uniform(0, big, size=2)
        if stroke == 0:
            x1, y1 = rng.uniform(0, big, size=2)
            draw.line([(x0, y0), (x1, y1)], fill=c, width=int(rng.integers(1, 3) * SUPERSAMPLE))
        elif stroke == 1:
            r = rng.uniform(0.05, 0.2) * big
            start = rng.uniform(0, 360)
            draw.arc([x0 - r, y0 - r, x0 + r, y0 + r], start, start + rng.uniform(30, 150), fill=c, width=SUPERSAMPLE)
        else:
            r = rng.uniform(0.5, 1.5) * SUPERSAMPLE
            draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=c)


def render(
    index: int, split: str, *, seed: int, size: int, kind: str | None = None
) -> tuple[Image.Image, Image.Image, int]:
    """Image, mask and label of sample `index` of `split`; the same arguments always give the same pixels.
    `kind`: instead of a class, another shape drawn the same way, or "clutter" (no shape at all); label -1."""
    stream = [seed, SPLITS.index(split), index] if kind is None else [seed, 10 + _KINDS.index(kind), index]
    rng = np.random.default_rng(stream)
    label = index % len(CLASSES) if kind is None else -1  # balanced classes; all else is drawn independently of it
    shape = CLASSES[label] if kind is None else kind
    big = size * SUPERSAMPLE
    bg, bg_mean = _background(rng, size)
    img = Image.fromarray(bg.astype(np.uint8)).resize((big, big), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(img)
    _draw_clutter(draw, rng, big)

    # The class shape: random area, position, rotation and a colour that contrasts with the background.
    side = rng.uniform(0.3, 0.45) * big  # sqrt of the area in pixels
    angle = rng.uniform(0, 2 * np.pi)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    if shape == "clutter":
        return img.resize((size, size), Image.Resampling.BOX), Image.new("L", (size, size), 0), label
    outline = _random_outline(shape, rng) if shape in RANDOM_OUTLINES else _UNIT_SHAPES[shape]
    pts = outline @ rot.T * side
    pts *= min(1.0, 0.48 * big / np.abs(pts).max())  # a long random outline shrunk to fit (the classes always do)
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


_KINDS = (*OUTLIER_KINDS, *NEAR_KINDS, *FAR_KINDS)


def render_other(kind: str, index: int, *, seed: int, size: int) -> Image.Image:
    """An image that is none of the classes: one of OUTLIER_KINDS, NEAR_KINDS or FAR_KINDS."""
    if kind == "scrambled":  # a class image cut into 4 x 4 tiles, shuffled: its textures without its outline
        rng = np.random.default_rng([seed, 10 + _KINDS.index(kind), index])
        image = np.asarray(render(index, "train", seed=seed + 1, size=size)[0]).copy()
        g = 4
        t = size // g
        tiles = [image[r * t : (r + 1) * t, c * t : (c + 1) * t].copy() for r in range(g) for c in range(g)]
        for n, i in enumerate(rng.permutation(g * g)):
            image[(n // g) * t : (n // g + 1) * t, (n % g) * t : (n % g + 1) * t] = tiles[i]
        return Image.fromarray(image)
    if kind == "blurred":  # a class image blurred until its outline is gone: colour fields, no shape
        return render(index, "train", seed=seed + 2, size=size)[0].filter(ImageFilter.GaussianBlur(radius=size / 10))
    if kind not in FAR_KINDS:
        return render(index, "train", seed=seed, size=size, kind=kind)[0]
    rng = np.random.default_rng([seed, 10 + _KINDS.index(kind), index])
    if kind == "noise":  # every pixel drawn on its own
        return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    if kind == "plasma":  # smooth random colour fields: a coarse random grid, upsampled
        n = int(rng.integers(2, 7))
        coarse = Image.fromarray(rng.integers(0, 256, (n, n, 3), dtype=np.uint8))
        return coarse.resize((size, size), Image.Resampling.BICUBIC)
    img = Image.new("RGB", (size, size), tuple(int(v) for v in _colour(rng)))  # blocks: overlapping rectangles
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(4, 12))):
        x0, y0 = rng.uniform(0, size, 2)
        w, h = rng.uniform(0.1, 0.6, 2) * size
        draw.rectangle([x0 - w / 2, y0 - h / 2, x0 + w / 2, y0 + h / 2], fill=tuple(int(v) for v in _colour(rng)))
    return img


Job = tuple[Path, str, int, int, int]  # (folder, split or kind, index, seed, size)


def _write_other(job: Job) -> None:
    folder, kind, index, seed, size = job
    render_other(kind, index, seed=seed, size=size).save(folder / kind / f"{index:05d}.png")


def _write(job: Job) -> None:
    root, split, index, seed, size = job
    img, mask, label = render(index, split, seed=seed, size=size)
    name = f"{CLASSES[label]}/{index:05d}.png"
    img.save(root / split / name)
    mask.save(root / "masks" / split / name)


def _plan(
    tmp: Path, counts: dict[str, int], other: dict[str, int], seed: int, size: int
) -> tuple[list[Job], list[Job]]:
    """The folders of a data set, made under `tmp`, and the images to write: the classes', then the others'."""
    for split in SPLITS:
        for c in CLASSES:
            (tmp / split / c).mkdir(parents=True)
            (tmp / "masks" / split / c).mkdir(parents=True)
    jobs = [(tmp, split, i, seed, size) for split in SPLITS for i in range(counts[split])]
    groups: list[tuple[Path, tuple[str, ...], int, int]] = [
        (tmp / "outliers" / split, OUTLIER_KINDS, other[split], 100 * n) for n, split in enumerate(("train", "val"))
    ]
    groups += [(tmp / "ood" / "near", NEAR_KINDS, other["ood"], 0), (tmp / "ood" / "far", FAR_KINDS, other["ood"], 0)]
    others = []
    for folder, kinds, n, offset in groups:  # offset: the val outliers are other images than the train ones
        for kind in kinds:
            (folder / kind).mkdir(parents=True)
            others += [(folder, kind, offset * 1000 + i, seed, size) for i in range(n)]
    return jobs, others


def generate(
    root: str | Path, *, seed: int = 0, size: int = 96, counts: dict[str, int] | None = None, workers: int = 2
) -> Path:
    """Write the data set under `root` unless an identical one is already there.

    Written to a temporary folder and renamed at the end, so an interrupted run leaves no half data set.
    """
    root = Path(root)
    counts = counts or {"train": 3000, "val": 500, "test": 1000}
    # None of the classes: per kind, training outliers (train, val) and the measured sets (near and far kinds)
    other = {"train": max(1, counts["train"] // 2 // len(OUTLIER_KINDS)),
             "val": max(1, counts["val"] // 2 // len(OUTLIER_KINDS)), "ood": max(1, counts["test"] // 10)}  # fmt: skip
    params = {
        "seed": seed,
        "size": size,
        "counts": counts,
        "classes": list(CLASSES),
        "other": other,
        "kinds": [list(OUTLIER_KINDS), list(NEAR_KINDS), list(FAR_KINDS)],  # lists: as json.loads gives them back
        "version": 3,
    }
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
    jobs, others = _plan(tmp, counts, other, seed, size)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for _ in track(pool.map(_write, jobs, chunksize=64), total=len(jobs), description=f"Generating {root}"):
            pass
        for _ in track(pool.map(_write_other, others, chunksize=64), total=len(others),
                       description=f"Generating {root}/outliers and {root}/ood"):  # fmt: skip
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
