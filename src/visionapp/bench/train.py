"""Training throughput: Lightning `fit` vs a plain PyTorch loop vs the compute ceiling, side by side, and the
input pipeline's paths against each other.

    python -m visionapp.bench.train [--steps 30] [--warmup 5] [--rounds 3] [--out bench/train_results.json]
    python -m visionapp.bench.train --device cuda --image-size 224 --batch-size 128 --num-workers 12 [--compile]

Same model (the default config's resnet18, 5 classes, random init), batch size, image size, data, threads
and device for all, alternated round by round; images/s counted after --warmup steps:
  ceiling    forward + backward + AdamW step on one batch already on the device (no data loading)
  loop       a plain PyTorch loop over the ShapesDataModule's train loader (the same loader `fit` uses; its
             `loader: auto` path: the GPU-resident cache on CUDA, workers cropping from the cache on the CPU)
  lightning  Trainer.fit of our LightningModule over the same DataModule (metrics, logging, scheduler on)
  input      the train loader alone, uint8 batches moved to the device: the data side's ceiling, to tell
             which side bounds the loop when loop / ceiling is low
and for each other input path in --compare, `loop_<path>` and `input_<path>`:
  files      workers decoding every image file every epoch (cache false: the path before the cache)
  workers    workers cropping from the decode-once cache
  device     whole batches cropped on the device from the cache (on the CPU: batched, in the main process)
On CUDA all run as `make train` does there: bf16 autocast, channels_last model and inputs, and with
--compile the model wrapped in torch.compile (compilation happens in the warm-up steps).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext, suppress
from pathlib import Path
from typing import Any

import lightning as L
import torch

from visionapp.bench import run_part
from visionapp.decode import load_image
from visionapp.train.data import LoaderConfig, ShapesDataModule
from visionapp.train.module import ImageClassifier


@dataclasses.dataclass
class Setup:
    device: torch.device
    compile: bool

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self):  # what Lightning's "bf16-mixed" precision plugin does around each step
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else nullcontext()

    def sync(self) -> None:  # CUDA runs asynchronously: a clock read needs the queued work done
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.cuda else x


def make_module(dm: ShapesDataModule, setup: Setup) -> ImageClassifier:
    torch.manual_seed(0)
    module = ImageClassifier(arch="resnet18", weights=None, class_names=dm.class_names, image_size=dm.image_size,
                             optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.05))  # fmt: skip
    if setup.cuda:
        module.model.to(memory_format=torch.channels_last)
    if setup.compile:
        module.model.compile()  # in place: the state_dict keys and the optimizer's parameters stay the same
    return module


def on_device(dm: ShapesDataModule, setup: Setup, batch: tuple[torch.Tensor, torch.Tensor]):
    """A loader batch (uint8) on the device and normalised there, as fit does (on_after_batch_transfer)."""
    x, y = batch
    return dm.on_after_batch_transfer((setup.inputs(x), y.to(setup.device, non_blocking=True)))


def train_steps(
    model: torch.nn.Module, batches: Iterator, dm: ShapesDataModule, setup: Setup, steps: int, warmup: int
) -> float:
    """images/s of forward + backward + AdamW step over `steps` batches, counted after `warmup` of them."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    images, start = 0, 0.0
    for i in range(steps):
        if i == warmup:
            setup.sync()
            images, start = 0, time.perf_counter()
        x, y = next(batches)
        if x.dtype == torch.uint8:  # from the loader (the ceiling's batch is already on the device)
            x, y = on_device(dm, setup, (x, y))
        opt.zero_grad(set_to_none=True)
        with setup.autocast():
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        images += len(y)
    setup.sync()
    return images / (time.perf_counter() - start)


def ceiling(dm: ShapesDataModule, setup: Setup, steps: int, warmup: int) -> float:
    model = make_module(dm, setup).model.to(setup.device).train()
    x = setup.inputs(torch.randn(dm.batch_size, 3, dm.image_size, dm.image_size, device=setup.device))
    y = torch.randint(0, len(dm.class_names), (dm.batch_size,), device=setup.device)
    return train_steps(model, iter(lambda: (x, y), None), dm, setup, steps, warmup)


def epochs(dm: ShapesDataModule) -> Iterator:
    loader = dm.train_dataloader()  # one loader for all epochs, so its persistent workers live on, as in fit
    while True:
        yield from loader


def plain_loop(dm: ShapesDataModule, setup: Setup, steps: int, warmup: int) -> float:
    model = make_module(dm, setup).model.to(setup.device).train()
    return train_steps(model, epochs(dm), dm, setup, steps, warmup)


def to_device(dm: ShapesDataModule, setup: Setup, batches: Iterator, n: int) -> int:
    """Take n loader batches to the device as the loader gives them (uint8; the normalisation that follows is the
    same arithmetic for every input path, and on a GPU a negligible one); the number of images."""
    images = 0
    for _ in range(n):
        x, y = next(batches)
        setup.inputs(x)
        images += len(y)
    setup.sync()
    return images


def input_pipeline(dm: ShapesDataModule, setup: Setup, steps: int, warmup: int) -> float:
    """The loader alone, batches moved to the device: the data side's own ceiling."""
    batches = epochs(dm)
    to_device(dm, setup, batches, warmup)
    start = time.perf_counter()
    return to_device(dm, setup, batches, steps - warmup) / (time.perf_counter() - start)


class _Clock(L.Callback):
    def __init__(self, setup: Setup, warmup: int) -> None:
        self.device_setup, self.warmup, self.images, self.start, self.end = setup, warmup, 0, 0.0, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            self.device_setup.sync()
            self.images, self.start = 0, time.perf_counter()
        self.images += len(batch[1])

    def on_train_end(self, trainer, pl_module) -> None:
        self.device_setup.sync()
        self.end = time.perf_counter()


def lightning_fit(dm: ShapesDataModule, setup: Setup, steps: int, warmup: int) -> float:
    clock = _Clock(setup, warmup)
    trainer = L.Trainer(max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[clock], accelerator=setup.device.type, devices=1,
                        precision="bf16-mixed" if setup.cuda else "32-true")  # fmt: skip
    trainer.fit(make_module(dm, setup), datamodule=dm)
    return clock.images / (clock.end - clock.start)


def input_scan(dm: ShapesDataModule, setup: Setup, workers: list[int], steps: int, warmup: int) -> dict:
    """What the input side costs: one image's decode and augmentation on one core, then the loader alone
    at each worker count with the CPU its workers and the main process keep busy (cores)."""
    out: dict = per_image_costs(dm)
    print(
        "  one image on one core: " + ", ".join(f"{k.removesuffix('_ms_per_image')} {v:.3f} ms" for k, v in out.items())
    )
    for n in workers:
        out[f"workers_{n}"] = loader_with_workers(dm, setup, n, steps, warmup)
        w = out[f"workers_{n}"]
        print(f"  input alone, {n:2d} workers: {w['images_per_s']:9.1f} images/s, workers busy "
              f"{w['worker_cores']:.1f} cores, main process {w['main_cores']:.1f}")  # fmt: skip
    return out


def per_image_costs(dm: ShapesDataModule) -> dict[str, float]:
    """ms per image on one core (as inside a loader worker) for decoding, augmenting, and with the cache: reading
    out of it and augmenting; 200 images, 3 alternated rounds, medians."""
    files = dm.split_files("train")[:200]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def ms_per_image(fn: Callable, items: list) -> float:
        start = time.perf_counter()
        for item in items:
            fn(item)
        return (time.perf_counter() - start) / len(items) * 1e3

    images = [load_image(f) for f in files]  # decoded once first: the file cache is warm, decoding is what is timed
    measures: dict[str, tuple[Callable, list]] = {
        "decode": (load_image, files),
        "augment": (dm.train_transform, images),
    }
    if (cache := dm.caches.get("train")) is not None:  # with it: a copy out of the memory map, the same crop + flip
        indices = list(range(len(files)))
        measures["read_and_augment_from_cache"] = (lambda i: dm.train_transform(cache.tensor(i)), indices)
        planar = [cache.tensor(i).contiguous() for i in indices]  # the layout the cache does not use
        measures["augment_planar_uint8"] = (dm.train_transform, planar)
    times: dict[str, list[float]] = {k: [] for k in measures}
    for _ in range(3):  # alternated, medians: this machine's speed drifts
        for k, (fn, items) in measures.items():
            times[k].append(ms_per_image(fn, items))
    torch.set_num_threads(threads)
    return {f"{k}_ms_per_image": statistics.median(v) for k, v in times.items()}


def loader_with_workers(dm: ShapesDataModule, setup: Setup, n: int, steps: int, warmup: int) -> dict[str, float]:
    """The loader alone with n workers: images/s, and the cores its workers and the main process keep busy."""
    import psutil

    me = psutil.Process()
    dm.loader = dataclasses.replace(dm.loader, num_workers=n)
    batches = epochs(dm)
    to_device(dm, setup, batches, warmup)  # starts the workers and fills their prefetch
    children = me.children(recursive=True)
    cpu0 = [sum(p.cpu_times()[:2]) for p in children], sum(me.cpu_times()[:2])
    start = time.perf_counter()
    seen = to_device(dm, setup, batches, steps)
    wall = time.perf_counter() - start
    worker_cpu = sum(sum(p.cpu_times()[:2]) for p in children) - sum(cpu0[0])
    result = {"images_per_s": seen / wall, "worker_cores": worker_cpu / wall,
              "main_cores": (sum(me.cpu_times()[:2]) - cpu0[1]) / wall}  # fmt: skip
    del batches  # ends this loader's workers before the next count starts
    return result


CONTENDERS = {"ceiling": ceiling, "loop": plain_loop, "lightning": lightning_fit, "input": input_pipeline}


def machine() -> dict:
    import platform

    import lightning
    import torchvision

    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "torchvision": torchvision.__version__,
            "lightning": lightning.__version__}  # fmt: skip
    with suppress(OSError, StopIteration):  # Linux only; elsewhere platform's guess stays
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


# The input paths --compare can set against the default (`auto`) one: the LoaderConfig fields that pick each.
PATHS: dict[str, dict[str, Any]] = {
    "files": {"cache": False, "mode": "workers"},
    "workers": {"mode": "workers"},
    "device": {"mode": "device"},
}


def data_module(args: argparse.Namespace, setup: Setup, **path: Any) -> ShapesDataModule:
    dm = ShapesDataModule(args.root, image_size=args.image_size, num_train=args.num_train, num_val=args.num_val,
                          num_test=args.num_test,
                          batch_size=args.batch_size, loader=LoaderConfig(num_workers=args.num_workers, **path),
                          outlier_exposure=False)  # fmt: skip  # the loops compared, without the OOD's outliers
    dm.target_device = setup.device
    dm.prepare_data()
    dm.setup("fit")
    return dm


def run(args: argparse.Namespace) -> dict:
    setup = Setup(torch.device(args.device), args.compile)
    if setup.cuda:
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels
        torch.set_float32_matmul_precision("high")
    dm = data_module(args, setup)
    if args.input_scan:
        return {"input_scan": input_scan(dm, setup, args.input_scan, args.steps, args.warmup), "machine": machine()}
    # The other paths: on the CPU the batched crop (the device path there), on a GPU the workers cropping per image.
    compare = args.compare if args.compare is not None else ["files", "workers" if setup.cuda else "device"]
    runs = {name: (CONTENDERS[name], dm) for name in args.contenders}
    for path in compare:
        other = data_module(args, setup, **PATHS[path])
        runs |= {f"{name}_{path}": (CONTENDERS[name], other) for name in ("loop", "input") if name in args.contenders}
    raw: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.rounds):
        for name, (fn, data) in runs.items():
            steps = args.input_steps if name.startswith("input") and args.input_steps else args.steps
            raw[name].append(fn(data, setup, steps, args.warmup))
    med = {k: statistics.median(v) for k, v in raw.items()}
    ratios = {"train.loop_vs_ceiling": ("loop", "ceiling"), "train.lightning_vs_loop": ("lightning", "loop")}
    ratios |= {f"train.input_vs_input_{p}": ("input", f"input_{p}") for p in compare}
    return {
        "images_per_second": med,
        "raw": raw,
        **{k: med[a] / med[b] for k, (a, b) in ratios.items() if a in med and b in med},
        "settings": {"device": str(setup.device), "precision": "bf16-mixed" if setup.cuda else "32-true",
                     "channels_last": setup.cuda, "compile": setup.compile, "steps": args.steps,
                     "warmup": args.warmup, "rounds": args.rounds, "batch_size": dm.batch_size,
                     "image_size": dm.image_size, "threads": torch.get_num_threads(), "workers": dm.loader.num_workers,
                     "loader": dm.loader_path("train"), "compare": compare,
                     "input_steps": args.input_steps or args.steps},
        "machine": machine(),
    }  # fmt: skip


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="data/shapes")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (all three contenders)")
    # The default config's data (96 px, 3000 images, batch 32, 2 loader workers) unless told otherwise.
    ap.add_argument("--image-size", type=int, default=96)
    ap.add_argument("--num-train", type=int, default=3000)
    ap.add_argument("--num-val", type=int, default=500, help="generated and cached, not measured")
    ap.add_argument("--num-test", type=int, default=1000, help="generated and cached, not measured")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--num-workers", type=int, default=2)
    ap.add_argument("--contenders", nargs="+", choices=list(CONTENDERS), default=list(CONTENDERS))
    ap.add_argument("--compare", nargs="*", choices=list(PATHS), default=None,
                    help="other input paths, each measured as loop_<path> and input_<path> (default: files, and "
                    "device on the CPU, workers on a GPU)")  # fmt: skip
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--input-steps", type=int, default=None, help="steps of the loader-alone contenders (--steps)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--input-scan",
        type=int,
        nargs="+",
        metavar="WORKERS",
        default=None,
        help="instead: profile the input side (decode, augment, the loader alone at these worker counts)",
    )
    ap.add_argument("--out", default="bench/train_results.json")
    return ap


def print_table(result: dict) -> None:
    for k, v in result["raw"].items():
        print(f"  {k:14s} {result['images_per_second'][k]:9.1f} images/s   [{min(v):.1f} .. {max(v):.1f}]")
    print("  " + "   ".join(f"{k.removeprefix('train.')} {v:.3f}" for k, v in result.items() if k.startswith("train.")))


def main(argv: list[str] | None = None) -> int:
    return run_part(parser(), run, lambda result: None if "input_scan" in result else print_table(result), argv)


if __name__ == "__main__":
    raise SystemExit(main())
