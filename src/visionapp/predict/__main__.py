"""Score a folder of images with a run's bundle: Lightning's `Trainer.predict`, one CSV row per image.

    python -m visionapp.predict --bundle runs/latest/bundle --images photos/ [--out predictions.csv] [--topk 5]
        [--batch-size 64] [--workers 2] [--strict] [--retry-errors] [--follow-links] [--devices 1 --num-nodes 1]
                                                                                        (make predict-folder)

Every image under the folder (recursively; hidden folders and files skipped, as everywhere in the project) gets a
row: its path relative to the folder, then class_1, probability_1, ... class_k, probability_k, calibrated as the
server answers. Files that cannot be read, and files that are not images, go to <out stem>.errors.csv with the
reason and do not stop the run (--strict: the first one does). Rows are written as each batch ends; running the
same command again skips what is already in the output, its errors file or the shards of a run that stopped, and
scores the rest. Under DDP (--devices/--num-nodes, or make launch-predict through TorchX) each rank writes its own
shard and rank 0 merges them, sorted by path, each image once; the output folder must be shared by the nodes.
One run writes an output at a time (a lock file beside it); links are followed inside the folder, each real file
once; images are decoded as the servers decode them, with their pixel limit.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from visionapp import imagefiles
from visionapp.bundle import load_bundle
from visionapp.errors import UserError, run_main
from visionapp.manifest import FORMS
from visionapp.predict.folder import FolderImages, collate
from visionapp.predict.module import BundlePredictor
from visionapp.predict.writer import ERROR_HEADER, Output, Progress, RowWriter, open_for_append


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default="runs/latest/bundle", help="the trained run's bundle that scores the images")
    ap.add_argument("--images", required=True, help="the folder of images (searched recursively)")
    ap.add_argument("--out", default="predictions.csv", help="the CSV written (errors beside it: <stem>.errors.csv)")
    ap.add_argument("--topk", type=int, default=5, help="classes per row (at most the model's)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers decoding the images")
    ap.add_argument("--strict", action="store_true", help="stop at the first file that cannot be scored")
    ap.add_argument(
        "--retry-errors",
        action="store_true",
        help="score again the files the errors file lists (a file half-copied when first scanned)",
    )
    ap.add_argument(
        "--follow-links",
        action="store_true",
        help="follow links that lead out of the folder (default: listed in the errors file, skipped)",
    )
    ap.add_argument("--devices", type=int, default=1, help="processes (GPUs) per node; more than 1: DDP")
    ap.add_argument("--num-nodes", type=int, default=1)
    ap.add_argument("--precision", default=None, help="default: bf16-mixed on a GPU, 32-true on the CPU")
    ap.add_argument("--runtime", choices=["auto", *FORMS], default="auto",
                    help="the model form (make export); auto: the fastest that passed its checks")  # fmt: skip
    return ap


def predict_folder(args: argparse.Namespace) -> dict[str, float]:
    root = Path(args.images)
    if not root.is_dir():
        raise UserError(f"{root} is not a folder; --images takes the folder of images to score")
    gpu = torch.cuda.is_available()
    bundle = load_bundle(Path(args.bundle), map_location="cuda" if gpu else "cpu", runtime=args.runtime)
    topk = min(args.topk, len(bundle.class_names))
    output = Output(Path(args.out))
    output.path.parent.mkdir(parents=True, exist_ok=True)
    ood = bundle.ood is not None
    if args.retry_errors and _rank() == 0:
        print(f"{output.forget_errors():,} files of {output.errors} to score again", flush=True)
    done = output.done(topk, ood)
    outside: list[Path] = []
    walked = imagefiles.walk_files(root, follow_outside=args.follow_links, outside=outside)
    found = {f: f.relative_to(root).as_posix() for f in walked}  # file → its row's path
    todo = [f for f, name in found.items() if name not in done]
    images = [f for f in todo if imagefiles.is_image_file(f)]
    names = [found[f] for f in images]
    trainer = L.Trainer(
        accelerator="gpu" if gpu else "cpu", devices=args.devices, num_nodes=args.num_nodes,
        strategy="ddp" if args.devices * args.num_nodes > 1 else "auto",
        precision=args.precision or ("bf16-mixed" if gpu and bundle.form == "eager" else "32-true"),
        logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        callbacks=[RowWriter(output, names, bundle.class_names, topk, args.strict, ood), Progress(len(images))],
    )  # fmt: skip
    if trainer.is_global_zero:
        others = [f for f in todo if not imagefiles.is_image_file(f)]
        list_other_files(output, others, root, args.strict)
        links = [f for f in outside if f.relative_to(root).as_posix() not in done]
        list_files(output, links, root, f"a link out of {root}, not followed (--follow-links follows it)")
        print(f"{len(found):,} files under {root}: {len(found) - len(todo):,} done before, {len(images):,} images to "
              f"score, {len(others):,} other files; model form {bundle.form_note}", flush=True)  # fmt: skip
    if images:
        folder = FolderImages(images, bundle.transform.geometry, bundle.transform.decode_side)  # as the servers decode
        loader = DataLoader(folder, batch_size=args.batch_size, num_workers=args.workers, collate_fn=collate,
                            pin_memory=gpu)  # fmt: skip
        start = time.perf_counter()
        trainer.predict(BundlePredictor(bundle, topk), loader, return_predictions=False)
        seconds = time.perf_counter() - start
    trainer.strategy.barrier("predicted")
    if not trainer.is_global_zero:
        return {}
    rows, errors = output.merge(topk, ood)
    print(
        f"{output.path}: {rows:,} images scored; {output.errors}: {errors:,} files not scored, with the reason",
        flush=True,
    )
    return {"rows": rows, "errors": errors, "scored": len(images), "seconds": seconds if images else 0.0}


def list_other_files(output: Output, files: list[Path], root: Path, strict: bool) -> None:
    """Files under the folder that are not images (by their extension) are listed in the errors file."""
    if files and strict:
        raise UserError(f"{files[0]} is not an image file ({len(files)} such under {root}); --strict stops here")
    list_files(output, files, root, f"not an image file (images are {', '.join(imagefiles.IMAGE_EXTENSIONS)})")


def list_files(output: Output, files: list[Path], root: Path, why: str) -> None:
    """`files` listed in the errors file, each with `why`."""
    if files:
        f, writer = open_for_append(output.shard(0, errors=True), ERROR_HEADER)
        with f:
            writer.writerows([file.relative_to(root).as_posix(), why] for file in files)


def _rank() -> int:
    """This process's rank in a DDP job (torchrun sets RANK), 0 alone: rank 0 holds the output's lock."""
    return int(os.environ.get("RANK", "0"))


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def score() -> int:
        if _rank() != 0:  # the job's other ranks write their own shards under rank 0's lock
            predict_folder(args)
            return 0
        with Output(Path(args.out)).writing():
            predict_folder(args)
        return 0

    return run_main(score)


if __name__ == "__main__":
    sys.exit(main())
