"""The run directory a `fit` writes, which every later stage reads:

    runs/<run>/  config.yaml  checkpoints/  metrics.json  metrics.csv  tensorboard/  confusion_matrix.png
                 reliability.png  report.html  test_files.txt (folder data)  bundle/ (docs/architecture.md)

`claim_run_dir` creates it before fit (never an existing one), marked INCOMPLETE; `write_run` fills it after fit
(calibration, metrics, plots, the bundle, the report), removes the mark and points runs/latest at it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import matplotlib
import torch
from lightning.pytorch.utilities import rank_zero_only
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from visionapp import run_report
from visionapp.bundle import save_bundle, versions
from visionapp.errors import UserError
from visionapp.manifest import INCOMPLETE, TEST_FILES
from visionapp.train import calibration, ood
from visionapp.train.card import write_card
from visionapp.train.data import FolderDataModule, ImageDataModule
from visionapp.train.module import ImageClassifier

matplotlib.use("Agg")  # files only; no display on servers and CI
log = logging.getLogger(__name__)


class Throughput(L.Callback):
    """Training images per second (train epochs only, validation excluded) and the fit's wall time."""

    def __init__(self) -> None:
        self.images, self.train_seconds, self.wall_seconds = 0, 0.0, 0.0

    def on_fit_start(self, trainer, pl_module) -> None:
        self._fit_start = time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epoch_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.images += len(batch[1]) * trainer.world_size

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.train_seconds += time.perf_counter() - self._epoch_start

    def on_fit_end(self, trainer, pl_module) -> None:
        self.wall_seconds = time.perf_counter() - self._fit_start


def check_run_name(name: str) -> str:
    """A run name is one folder name under runs/: no path, not hidden, not `latest` (the link to the newest)."""
    if not name or name in (".", "..", "latest") or name.startswith(".") or any(c in name for c in "/\\\0"):
        raise UserError(
            f"run_name {name!r} is not a run folder's name: use letters, digits, '-', '_' or '.', no path separator, "
            "not starting with '.', not 'latest'"
        )
    return name


def claim_run_dir(runs_dir: Path, name: str | None, arch: str) -> Path:
    """Create the new run's directory, marked INCOMPLETE until write_run finishes it; never an existing one.

    A name given (--run_name, VISIONAPP_RUN_NAME) that is taken is refused; the default name (<time>-<arch>) gets a
    -2, -3, ... suffix when another run started in the same second. Under DDP only rank 0 claims (the ranks share
    the name TorchX gives them); the others use the same path.
    """
    given = name is not None
    base = check_run_name(name) if name is not None else time.strftime("%Y%m%d-%H%M%S") + f"-{arch}"
    if rank_zero_only.rank != 0:  # type: ignore[attr-defined]
        return runs_dir / base
    runs_dir.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        run_dir = runs_dir / (base if n == 1 else f"{base}-{n}")
        try:
            run_dir.mkdir()
        except FileExistsError:
            if given:
                raise UserError(
                    f"{run_dir} exists: a run is never overwritten; pick another --run_name, or move that run away"
                ) from None
            continue
        (run_dir / INCOMPLETE).write_text(f"fit started {time.strftime('%Y-%m-%d %H:%M:%S')} and has not finished\n")
        return run_dir
    raise UserError(f"{runs_dir} has runs {base} to {base}-999; pick a --run_name")


def test_split(data: ImageDataModule) -> str:
    """Where the test figures come from, said plainly."""
    if isinstance(data, FolderDataModule) and (data.root / "train").is_dir() and not (data.root / "test").is_dir():
        return f"test: {data.test_fraction:.0%} of {data.root / 'train'} held out (seeded), no {data.root / 'test'}"
    return "test"


def write_run(
    run_dir: Path,
    module: ImageClassifier,
    data: ImageDataModule,
    trainer: L.Trainer,
    throughput: Throughput,
    confusion: torch.Tensor,
    *,
    val_acc: float | None,
    test_results: dict[str, float],
    ood_accept: float = 0.95,
) -> None:
    """Everything after a finished fit: calibration, metrics.json, the plots, the bundle, the report; then the
    INCOMPLETE mark goes and runs/latest points here."""
    run_dir.mkdir(parents=True, exist_ok=True)
    passes = collect_passes(module, data)  # each split through the model once, for calibration and OOD alike
    calibrated = calibrate(run_dir, passes["val"], passes["test"])
    sets = [name for name in passes if name not in ("val", "test", "train", "val_outliers")]
    record, bank, ood_entry = ood.measure(passes, sets=sets, temperature=calibrated["temperature"], accept=ood_accept,
                                          plot=run_dir / "ood.png" if sets else None)  # fmt: skip
    metrics = run_metrics(module, data, trainer, throughput, val_acc, test_results, calibrated)
    metrics["split_sizes"] = {name: len(passes[name].logits) for name in ("train", "val", "test")}
    metrics["ood"] = ood_entry
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if isinstance(data, FolderDataModule):  # the held-out images, for the explain stage (no data module there)
        (run_dir / TEST_FILES).write_text("\n".join(data.split_files("test")) + "\n")
    plot_confusion(run_dir / "confusion_matrix.png", module, confusion, title=f"{metrics['arch']} on {data.name}: "
                   f"test accuracy {metrics['test_acc']:.3f}")  # fmt: skip
    save_bundle(
        run_dir / "bundle",
        module.model,
        arch=metrics["arch"],
        class_names=module.class_names,
        image_size=data.image_size,
        mean=data.mean,
        std=data.std,
        pretrained=module.pretrained_info.to_dict(),
        metrics={k: metrics[k] for k in ("dataset", "val_acc", "test_acc", "epochs")},
        temperature=calibrated["temperature"],
        ood=record.to_dict(),
        ood_bank=bank,
    )
    write_card(run_dir / "bundle", metrics, run_dir / "config.yaml")  # MODEL_CARD.md: the run's figures, in words
    (run_dir / INCOMPLETE).unlink(missing_ok=True)  # the bundle is whole: archive and serve may take it now
    run_report.build(run_dir)  # report.html: the run at a glance (make explain adds its quality table)
    point_latest(run_dir)
    log.info("run written to %s (runs/latest points here)", run_dir)
    print(summary(run_dir, metrics, calibrated, ood_entry))


def summary(run_dir: Path, metrics: dict[str, Any], calibrated: dict[str, float], ood_entry: dict[str, Any]) -> str:
    """The lines `fit` ends with: where the run is, its accuracy, calibration and out-of-distribution figures."""
    return (
        f"\nRun: {run_dir}  test_acc={metrics['test_acc']:.4f}  wall_seconds={metrics['wall_seconds']}  "
        f"ECE {calibrated['ece_before']:.3f} → {calibrated['ece_after']:.3f} (temperature {calibrated['temperature']})"
        + "".join(
            f"\n  out of distribution ({ood_entry['method']}): AUROC {name} {ood_entry[f'auroc_{name}']:.3f}, "
            f"{ood_entry['flagged'][name]:.0%} of {name} flagged"
            for name in ood_entry["sets"]
        )
    )


def collect_passes(module: ImageClassifier, data: ImageDataModule) -> dict[str, ood.Pass]:
    """The best checkpoint's logits, features and labels on val, test, train, each out-of-distribution set the data
    module names, and its validation outliers where it has them (visionapp.train.ood)."""
    sources = data.source_splits()
    loaders: dict[str, Any] = {"val": data.val_dataloader(), "test": data.test_dataloader(),
                               "train": data.eval_loader(sources["train"])}  # fmt: skip
    loaders |= {name: data.eval_loader(ds) for name, ds in data.ood_sets().items()}
    outliers = data.outliers("val")
    if outliers is not None:
        loaders["val_outliers"] = data.eval_loader(outliers)
    return {
        name: ood.collect(module.model, batches, data.on_after_batch_transfer, module.device)
        for name, batches in loaders.items()
    }


def calibrate(run_dir: Path, val: ood.Pass, test: ood.Pass) -> dict[str, float]:
    """A temperature fitted on val (the best checkpoint's logits), measured on test; reliability.png draws it."""
    calibrated = calibration.calibrate((val.logits, val.labels), (test.logits, test.labels))
    calibration.reliability_diagram(test.logits, test.labels, calibrated["temperature"], run_dir / "reliability.png")
    return calibrated


def run_metrics(
    module: ImageClassifier,
    data: ImageDataModule,
    trainer: L.Trainer,
    throughput: Throughput,
    val_acc: float | None,
    test_results: dict[str, float],
    calibrated: dict[str, float],
) -> dict[str, Any]:
    """metrics.json: what ran, on what, how well and how fast."""
    return {
        "arch": module.hparams["arch"],
        "dataset": data.name,
        "data_root": str(getattr(data, "root", "")) or None,  # explain/ finds the test split (and masks) here
        "ood_root": str(getattr(data, "ood_root", "") or "") or None,  # make export checks int8's OOD scores here
        "num_classes": len(module.class_names),
        "class_names": module.class_names,
        "pretrained": module.pretrained_info.pretrained,
        "pretrained_weights": module.pretrained_info.weights,
        "pretrained_reason": module.pretrained_info.reason,
        "val_acc": val_acc,
        "test_acc": test_results.get("test/acc"),
        "test_acc_per_class": {c: test_results.get(f"test/acc_{c}") for c in module.class_names},
        "test_split": test_split(data),
        "epochs": trainer.current_epoch,
        "global_steps": trainer.global_step,
        "wall_seconds": round(throughput.wall_seconds, 2),
        "train_images_per_second": round(throughput.images / max(throughput.train_seconds, 1e-9), 2),
        "input_pipeline": data.loader_path("train"),  # device (batches cropped there) or workers (see data.py)
        "device": str(module.device) if module.device.type == "cpu" else torch.cuda.get_device_name(module.device),
        "precision": str(trainer.precision),
        "world_size": trainer.world_size,
        "best_checkpoint": getattr(trainer.checkpoint_callback, "best_model_path", "") or None,
        "calibration": calibrated,
        "versions": versions(),
    }


def plot_confusion(path: Path, module: ImageClassifier, confusion: torch.Tensor, title: str) -> None:
    fig, ax = module.test_confusion.plot(val=confusion, labels=module.class_names)
    assert isinstance(ax, Axes) and isinstance(fig, Figure)
    ax.set_title(title)
    fig.set_size_inches(max(6, 0.5 * len(module.class_names)), max(5, 0.45 * len(module.class_names)))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def point_latest(run_dir: Path) -> None:
    """runs/latest → this run, replaced in one step (a relative link, so the runs folder can move)."""
    latest = run_dir.parent / "latest"
    tmp = run_dir.parent / f".latest-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(run_dir.name)
    os.replace(tmp, latest)
