"""LightningCLI wiring: links data → model, picks precision for the device, claims the run directory before `fit`
and, after it, tests the best checkpoint and has the run written (visionapp.train.run).

    python -m visionapp fit --config configs/train.yaml [--trainer.max_epochs=2 ...] [--debug]
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from visionapp.errors import UserError, debugging, run_main
from visionapp.manifest import INCOMPLETE
from visionapp.train.data import ImageDataModule
from visionapp.train.module import ImageClassifier
from visionapp.train.run import Throughput, claim_run_dir, write_run
from visionapp.train.track import local_tracking, log_run, name_runs


def default_precision() -> str | None:
    """bf16 mixed precision on GPUs that have it, fp16 mixed on older GPUs, fp32 on the CPU."""
    if not torch.cuda.is_available():
        return None
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"


class CLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--runs_dir", type=str, default="runs", help="where fit writes its run directory")
        parser.add_argument("--run_name", type=str | None, default=None, help="default: <time>-<arch>")
        accept = "the share of validation images the out-of-distribution threshold accepts"
        parser.add_argument("--ood_accept", type=float, default=0.95, help=accept)
        registry = "the MLflow registry's name for the run's model (with an MLflow logger; null: not registered)"
        parser.add_argument("--registered_model", type=str | None, default="classifier", help=registry)
        # The DataModule knows the classes and the preprocessing; the model records them (hparams, bundle).
        for attr in ("class_names", "image_size", "mean", "std"):
            parser.link_arguments(f"data.{attr}", f"model.{attr}", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        if cfg.trainer.precision is None:
            cfg.trainer.precision = default_precision()
        if torch.cuda.is_available():
            torch.set_float32_matmul_precision("high")  # TF32 matmuls for whatever stays in fp32
        if "runs_dir" in cfg:
            local_tracking(cfg.trainer.logger, Path(cfg.runs_dir))

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
            # Our run layout always (logger: false turns every logger off); loggers the config names (MLflow's:
            # configs/mlflow.yaml) log beside it.
            configured = self._get(self.config_init, "trainer", default={}).get("logger")
            if configured is not False:
                extra = (
                    [] if configured in (None, True) else configured if isinstance(configured, list) else [configured]
                )
                kwargs["logger"] = [
                    CSVLogger(self.run_dir, name="", version=""),  # run_dir/metrics.csv, run_dir/config.yaml
                    TensorBoardLogger(self.run_dir, name="tensorboard", version=""),
                    *extra,
                ]
                name_runs(kwargs["logger"], self.run_dir.name)
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
                ood_accept=self.config["fit"].ood_accept,
            )
            # the finished run in the user's tracker, where one is configured, its model registered
            log_run(trainer.loggers, self.run_dir, self.config["fit"].registered_model)
        # Every rank waits for rank 0's run directory (calibration, report): a rank that exits first tears down
        # the process group under rank 0, which then aborts.
        trainer.strategy.barrier("run written")


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
