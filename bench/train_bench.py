"""Training throughput: Lightning `fit` vs a plain PyTorch loop vs the compute ceiling, side by side.

    python bench/train_bench.py [--steps 30] [--warmup 5] [--rounds 3] [--out bench/train_results.json]

Same model (the default config's resnet18, 5 classes, random init), batch size, image size, data and
threads for all three, alternated round by round; images/s counted after --warmup steps:
  ceiling    forward + backward + AdamW step on one batch already in memory (no data loading)
  loop       a plain PyTorch loop over the ShapesDataModule's train loader (the same loader `fit` uses)
  lightning  Trainer.fit of our LightningModule over the same DataModule (metrics, logging, scheduler on)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import lightning as L
import torch

from visionapp.data import ShapesDataModule
from visionapp.module import ImageClassifier


def make_module(dm: ShapesDataModule) -> ImageClassifier:
    torch.manual_seed(0)
    return ImageClassifier(arch="resnet18", weights=None, class_names=dm.class_names, image_size=dm.image_size,
                           optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.05))  # fmt: skip


def ceiling(dm: ShapesDataModule, steps: int, warmup: int) -> float:
    model = make_module(dm).model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    x = torch.randn(dm.batch_size, 3, dm.image_size, dm.image_size)
    y = torch.randint(0, len(dm.class_names), (dm.batch_size,))
    for i in range(steps):
        if i == warmup:
            t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return (steps - warmup) * dm.batch_size / (time.perf_counter() - t)


def plain_loop(dm: ShapesDataModule, steps: int, warmup: int) -> float:
    model = make_module(dm).model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    images, t = 0, 0.0
    for i, (x, y) in enumerate(dm.train_dataloader()):
        if i == warmup:
            t, images = time.perf_counter(), 0
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        images += len(y)
        if i + 1 == steps:
            break
    return images / (time.perf_counter() - t)


class _Clock(L.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.images, self.start, self.end = warmup, 0, 0.0, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step > self.warmup:
            self.images += len(batch[1])
        self.end = time.perf_counter()


def lightning_fit(dm: ShapesDataModule, steps: int, warmup: int) -> float:
    clock = _Clock(warmup)
    trainer = L.Trainer(max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[clock], accelerator="cpu", devices=1)  # fmt: skip
    trainer.fit(make_module(dm), datamodule=dm)
    return clock.images / (clock.end - clock.start)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="data/shapes")
    ap.add_argument("--image-size", type=int, default=96)
    ap.add_argument("--num-train", type=int, default=3000)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="bench/train_results.json")
    args = ap.parse_args(argv)
    # The default config's data (96 px, 3000 images, batch 32, 2 loader workers) unless told otherwise.
    dm = ShapesDataModule(args.root, image_size=args.image_size, num_train=args.num_train)
    dm.prepare_data()
    dm.setup("fit")
    contenders = {"ceiling": ceiling, "loop": plain_loop, "lightning": lightning_fit}
    raw: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(args.rounds):
        for name, fn in contenders.items():
            raw[name].append(fn(dm, args.steps, args.warmup))
    med = {k: statistics.median(v) for k, v in raw.items()}
    result = {
        "images_per_second": med,
        "raw": raw,
        "train.loop_vs_ceiling": med["loop"] / med["ceiling"],
        "train.lightning_vs_loop": med["lightning"] / med["loop"],
        "settings": {"steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "batch_size": dm.batch_size,
                     "image_size": dm.image_size, "threads": torch.get_num_threads(), "workers": dm.num_workers},
    }  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    for k, v in raw.items():
        print(f"{k:10s} {med[k]:8.1f} images/s   [{min(v):.1f} .. {max(v):.1f}]")
    ratios = result["train.loop_vs_ceiling"], result["train.lightning_vs_loop"]
    print(f"loop / ceiling {ratios[0]:.3f}   lightning / loop {ratios[1]:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
