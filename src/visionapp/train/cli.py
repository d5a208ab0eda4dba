"""LightningCLI wiring: links data → model, picks precision for the device, and after `fit` tests the best
checkpoint and writes the run directory (config.yaml, checkpoints/, metrics.json, confusion_matrix.png,
bundle/) that every later stage reads. runs/latest points at the newest run.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import matplotlib
import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from visionapp.bundle import INCOMPLETE, TEST_FILES, save_bundle, versions
from visionapp.errors import UserError, debugging, run_main
from visionapp.explain import report
from visionapp.train import calibration
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


def default_precision() -> str | None:
    """bf16 mixed precision on GPUs that have it, fp16 mixed on older GPUs, fp32 on the CPU."""
    if not torch.cuda.is_available():
        return None
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"


class CLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--runs_dir", type=str, default="runs", help="where fit writes its run directory")
        parser.add_argument("--run_name", type=str | None, default=None, help="default: <time>-<arch>")
        # The DataModule knows the classes and the preprocessing; the model records them (hparams, bundle).
        for attr in ("class_names", "image_size", "mean", "std"):
            parser.link_arguments(f"data.{attr}", f"model.{attr}", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        if cfg.trainer.precision is None:
            cfg.trainer.precision = default_precision()
        if torch.cuda.is_available():
            torch.set_float32_matmul_precision("high")  # TF32 matmuls for whatever stays in fp32

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        self.throughput = Throughput()
        if self.subcommand == "fit":
            cfg = self.config["fit"]
            self.run_dir = claim_run_dir(
                Path(cfg.runs_dir), cfg.run_name or os.environ.get("VISIONAPP_RUN_NAME"), cfg.model.arch
            )
            # The loggers write into the run directory claim_run_dir made (holding its INCOMPLETE mark): not a
            # previous run's, so CSVLogger's warning that it "exists and is not empty" would only mislead.
            warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")
            if cfg.trainer.logger in (None, True):  # our run layout, unless the config picks its own loggers
                kwargs["logger"] = [
                    CSVLogger(self.run_dir, name="", version=""),  # run_dir/metrics.csv, run_dir/config.yaml
                    TensorBoardLogger(self.run_dir, name="tensorboard", version=""),
                ]
            kwargs.setdefault("default_root_dir", str(self.run_dir))
        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks.append(self.throughput)  # type: ignore[attr-defined]
        return trainer

    def after_fit(self) -> None:
        trainer, module, data = self.trainer, self.model, self.datamodule
        if trainer.interrupted:  # Ctrl-C: Lightning stopped gracefully; the run stays marked, nothing more is written
            last = self.run_dir / "checkpoints" / "last.ckpt"
            resume = f"; resume it with --ckpt_path={last}" if last.is_file() else ""
            if trainer.is_global_zero:
                (self.run_dir / INCOMPLETE).write_text(
                    f"fit was interrupted at epoch {trainer.current_epoch}, step {trainer.global_step}{resume}\n"
                )
            raise UserError(f"fit was interrupted; {self.run_dir} is marked incomplete (INCOMPLETE){resume}")
        ckpt = trainer.checkpoint_callback
        best = getattr(ckpt, "best_model_path", "")
        val_acc = getattr(ckpt, "best_model_score", None) if best else trainer.callback_metrics.get("val/acc")
        results = dict(trainer.test(module, datamodule=data, ckpt_path="best" if best else None)[0])
        confusion = module.test_confusion.compute()  # a collective under DDP: every rank takes part
        if trainer.is_global_zero:
            write_run(
                self.run_dir,
                module,
                data,
                trainer,
                self.throughput,
                confusion,
                val_acc=float(val_acc) if val_acc is not None else None,
                test_results=results,
            )
        # Every rank waits for rank 0's run directory (calibration, report): a rank that exits first tears down
        # the process group under rank 0, which then aborts.
        trainer.strategy.barrier("run written")


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
) -> None:
    """metrics.json, confusion_matrix.png and bundle/ of a finished fit; then point runs/latest here."""
    run_dir.mkdir(parents=True, exist_ok=True)
    arch = module.hparams["arch"]
    # Calibration: a temperature fitted on val (the best checkpoint's logits), measured on test.
    val, test = (
        calibration.collect_logits(module.model, loader, data.on_after_batch_transfer, module.device)
        for loader in (data.val_dataloader(), data.test_dataloader())
    )
    calibrated = calibration.calibrate(val, test)
    calibration.reliability_diagram(*test, calibrated["temperature"], run_dir / "reliability.png")
    metrics = {
        "arch": arch,
        "dataset": data.name,
        "data_root": str(getattr(data, "root", "")) or None,  # explain/ finds the test split (and masks) here
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
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if isinstance(data, FolderDataModule):  # the held-out images, for the explain stage (no data module there)
        (run_dir / TEST_FILES).write_text("\n".join(data.split_files("test")) + "\n")

    fig, ax = module.test_confusion.plot(val=confusion, labels=module.class_names)
    assert isinstance(ax, Axes) and isinstance(fig, Figure)
    ax.set_title(f"{arch} on {data.name}: test accuracy {metrics['test_acc']:.3f}")
    fig.set_size_inches(max(6, 0.5 * len(module.class_names)), max(5, 0.45 * len(module.class_names)))
    fig.tight_layout()
    fig.savefig(run_dir / "confusion_matrix.png", dpi=120)

    save_bundle(
        run_dir / "bundle",
        module.model,
        arch=arch,
        class_names=module.class_names,
        image_size=data.image_size,
        mean=data.mean,
        std=data.std,
        pretrained=module.pretrained_info.to_dict(),
        metrics={k: metrics[k] for k in ("dataset", "val_acc", "test_acc", "epochs")},
        temperature=calibrated["temperature"],
    )
    (run_dir / INCOMPLETE).unlink(missing_ok=True)  # the bundle is whole: archive and serve may take it now
    report.build(run_dir)  # report.html: the run at a glance (make explain adds its quality table)
    latest = run_dir.parent / "latest"
    tmp = run_dir.parent / f".latest-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(run_dir.name)  # relative, so the runs folder can move
    os.replace(tmp, latest)
    log.info("run written to %s (runs/latest points here)", run_dir)
    print(
        f"\nRun: {run_dir}  test_acc={metrics['test_acc']:.4f}  wall_seconds={metrics['wall_seconds']}  "
        f"ECE {calibrated['ece_before']:.3f} → {calibrated['ece_after']:.3f} (temperature {calibrated['temperature']})"
    )


def cli_main(args: list[str] | None = None) -> CLI:
    # Our own warnings (e.g. "no pretrained weights, random init") must reach the console with their level.
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("visionapp").setLevel(logging.INFO)
    return CLI(
        ImageClassifier, ImageDataModule, subclass_mode_data=True, args=args, save_config_kwargs={"overwrite": True}
    )


def main(argv: list[str] | None = None) -> int:
    """The `python -m visionapp` entry point: a DataError or another UserError is one `error: ...` line, exit 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = debugging(args)
    args = [a for a in args if a != "--debug"]
    if argv is None:  # LightningCLI reads sys.argv itself (and warns when given both)
        sys.argv[1:] = args

    def fit() -> int:
        cli_main(None if argv is None else args)
        return 0

    return run_main(fit, debug=debug)
