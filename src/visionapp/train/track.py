"""Runs in the user's tracker: what a finished run logs to MLflow beside its folder (configs/mlflow.yaml adds
Lightning's MLFlowLogger; its parameters and per-step metrics come through Lightning itself).

Only the logger's own methods and its client are used here: nothing imports mlflow unless the overlay asks for it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger, MLFlowLogger

from visionapp.manifest import CARD_FILE, read_meta

RUN_FILES = ("metrics.json", "report.html", "config.yaml", "test_files.txt")  # beside the figures (*.png)


def local_tracking(loggers: Any, runs_dir: Path) -> None:
    """An MLFlowLogger the config gives no tracking URI (and MLFLOW_TRACKING_URI names none) logs to a local
    SQLite store in runs_dir, its artifacts beside it: MLflow 3 refuses its old file store, Lightning's default."""
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        if not str(getattr(logger, "class_path", "")).endswith("MLFlowLogger") or logger.init_args.tracking_uri:
            continue
        logger.init_args.tracking_uri = f"sqlite:///{(runs_dir / 'mlflow.db').resolve()}"
        logger.init_args.artifact_location = logger.init_args.artifact_location or str(
            (runs_dir / "mlflow-artifacts").resolve()
        )


def mlflow_loggers(loggers: list[Logger]) -> list[MLFlowLogger]:
    return [lg for lg in loggers if isinstance(lg, MLFlowLogger)]


def name_runs(loggers: list[Logger], run_name: str) -> None:
    """Each MLflow run is named as the run's folder (unless the config named it): the tracker and runs/ agree."""
    for logger in mlflow_loggers(loggers):
        logger.tags = {"mlflow.runName": run_name, **(logger.tags or {})}


def figures(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """metrics.json's numbers, flattened to MLflow's metric names (nested keys joined by '.'; lists left out)."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= figures(value, f"{name}.")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name.replace("/", "_")] = float(value)
    return flat


def log_run(loggers: list[Logger], run_dir: Path, registered_model: str | None = None) -> None:
    """The finished run in each MLflow run: metrics.json's figures (accuracy, calibration, OOD AUROCs...) as
    metrics prefixed `run.`, the run's files, figures and model card as artifacts, and the bundle as an MLflow
    model (`visionapp.registry`), registered as `registered_model` with the figures as the version's tags."""
    trackers = mlflow_loggers(loggers)
    if not trackers:
        return
    from visionapp.registry import register  # mlflow: the track extra, there since an MLflow logger is

    bundle = run_dir / "bundle"
    figures_ = figures(json.loads((run_dir / "metrics.json").read_text()))
    card = bundle / CARD_FILE
    files = [p for p in (*(run_dir / f for f in RUN_FILES), *sorted(run_dir.glob("*.png")), card) if p.is_file()]
    tags = {"visionapp.run_dir": str(run_dir.resolve()),
            "visionapp.arch": str(read_meta(bundle).get("arch", ""))}  # fmt: skip
    if card.is_file():  # the card shown on the run's page
        tags["mlflow.note.content"] = card.read_text()
    for logger in trackers:
        logger.log_metrics({f"run.{k}": v for k, v in figures_.items()})
        client, run_id = logger.experiment, logger.run_id
        for path in files:
            client.log_artifact(run_id, str(path))
        for key, value in tags.items():
            client.set_tag(run_id, key, value)
        if registered_model and run_id:
            version_tags = {k: f"{v:.6g}" for k, v in figures_.items()} | {"run": run_dir.name}
            model_version = register(client, run_id, bundle, registered_model, version_tags)
            client.set_tag(run_id, "visionapp.registered_model", f"models:/{registered_model}/{model_version}")
