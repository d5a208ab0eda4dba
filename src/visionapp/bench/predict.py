"""make bench's predict part: a folder of photo-sized JPEGs (640 x 480, generated) scored at 224 px three ways,
alternated over rounds, images/s each:

  predict   the predict stage as make predict-folder runs it (Trainer.predict, loader workers decoding the JPEGs)
  forward   the model's forward pass alone on the same images already decoded and preprocessed, at the same batch
            size: the ceiling
  served    our TorchServe (the same weights at 224 px), the folder sent one image a request at concurrency 8
All three run the default form (the bundle copied at 224 px and exported into --forms, as make export does).

    python -m visionapp.bench.predict --bundle runs/latest/bundle [--images 512] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from visionapp import shapes
from visionapp.bench import run_part
from visionapp.bench.serve import FORM_CHOICES, Server, check_resizable, exported_bundle, our_archives
from visionapp.bundle import load_bundle
from visionapp.decode import load_image
from visionapp.deploy.loadgen import run_load
from visionapp.predict.__main__ import parser as predict_parser
from visionapp.predict.__main__ import predict_folder

SIZE = 224
PHOTO = (640, 480)


def photo_folder(root: Path, n: int) -> list[Path]:
    """n JPEGs of the shapes at a camera's 640 x 480, as a folder of photos to score."""
    root.mkdir(parents=True)
    files = []
    for i in range(n):
        img, _, _ = shapes.render(i, "test", seed=11, size=240)
        files.append(root / f"IMG_{i:05d}.jpg")
        img.resize(PHOTO).save(files[-1], quality=90)
    return files


def forward_ceiling(bundle_dir: Path, files: list[Path], batch_size: int) -> float:
    """images/s of the calibrated forward alone (the default form) over the folder's images, decoded and
    preprocessed beforehand."""
    bundle = load_bundle(bundle_dir, runtime="auto")
    x = torch.stack([bundle.transform(load_image(f)) for f in files])
    with torch.inference_mode():
        bundle.probabilities(x[:batch_size])  # warm
        start = time.perf_counter()
        for batch in x.split(batch_size):
            bundle.probabilities(batch)
        return len(x) / (time.perf_counter() - start)


def decode_ms(bundle_dir: Path, files: list[Path]) -> float:
    """Milliseconds of one core a file takes to become the model's input as a loader worker makes it (decode at the
    size the model needs, then the antialiased resize): the work the forward pass must hide."""
    transform = load_bundle(bundle_dir).transform
    start = time.perf_counter()
    for f in files:
        transform.geometry(load_image(f, min_side=transform.decode_side))
    return (time.perf_counter() - start) / len(files) * 1e3


def run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        check_resizable(Path(args.bundle), SIZE)
        served = Path(args.staging) if args.staging else tmpdir / "served"
        bundle_dir, _ = exported_bundle(Path(args.bundle), served, tuple(args.forms), image_size=SIZE)
        mar = our_archives(bundle_dir, tmpdir / "store")
        form = load_bundle(bundle_dir, runtime="auto").form  # what all three run
        files = photo_folder(tmpdir / "photos", args.images)
        bodies = [f.read_bytes() for f in files]
        raw: dict[str, list[float]] = {"predict": [], "forward": [], "served": []}
        decode = []
        with Server(mar, tmpdir / "served") as server:
            run_load(server.url(), server.key, bodies, requests=min(len(bodies), 64), concurrency=8, max_seconds=300)
            for i in range(args.rounds):
                out = tmpdir / f"round{i}" / "predictions.csv"
                predict_args = predict_parser().parse_args(
                    ["--bundle", str(bundle_dir), "--images", str(tmpdir / "photos"), "--out", str(out),
                     "--batch-size", str(args.batch_size), "--workers", str(args.workers), "--runtime", "auto"]
                )  # fmt: skip
                summary = predict_folder(predict_args)
                raw["predict"].append(summary["scored"] / summary["seconds"])
                raw["forward"].append(forward_ceiling(bundle_dir, files, args.batch_size))
                decode.append(decode_ms(bundle_dir, files))
                r = run_load(server.url(), server.key, bodies, requests=len(bodies), concurrency=8, max_seconds=600)
                raw["served"].append(r["requests_per_second"])
    median = {k: statistics.median(v) for k, v in raw.items()}
    # The best any overlap of decoding and forward can do on these cores: every core busy, the forward's share of
    # the work (its threads' milliseconds an image) against the decoding's
    forward_core_ms = torch.get_num_threads() * 1e3 / median["forward"]
    decode_core_ms = statistics.median(decode)
    return {
        "images_per_second": median,
        "raw": raw,
        "cost": {
            "decode_core_ms": decode_core_ms,
            "forward_core_ms": forward_core_ms,
            "forward_threads": torch.get_num_threads(),
            "overlap_bound": forward_core_ms / (forward_core_ms + decode_core_ms),
        },
        "predict.vs_forward_ceiling_224px": median["predict"] / median["forward"],
        "predict.vs_served_c8_224px": median["predict"] / median["served"],
        "settings": {
            "images": args.images,
            "photo": list(PHOTO),
            "image_size": SIZE,
            "batch_size": args.batch_size,
            "workers": args.workers,
            "rounds": args.rounds,
            "concurrency": 8,
            "form": form,
        },
    }


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default="runs/latest/bundle")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--forms", nargs="*", choices=FORM_CHOICES, default=list(FORM_CHOICES))
    ap.add_argument("--staging", default=None, help="as the serve bench's: a bundle staged and exported at 224 px")
    ap.add_argument("--out", default="bench/predict_results.json")
    return ap


def print_table(result: dict) -> None:
    for k, v in result["images_per_second"].items():
        low, high = min(result["raw"][k]), max(result["raw"][k])
        print(f"  {k:8s} {v:8.1f} images/s [{low:.1f} .. {high:.1f}]")
    for k in ("predict.vs_forward_ceiling_224px", "predict.vs_served_c8_224px"):
        print(f"  {k:36s} {result[k]:.3f}")


def main(argv: list[str] | None = None) -> int:
    return run_part(parser(), run, print_table, argv)


if __name__ == "__main__":
    sys.exit(main())
