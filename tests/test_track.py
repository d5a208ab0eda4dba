"""Runs in the user's tracker: make mlflow starts MLflow's real tracking server; a fit with configs/mlflow.yaml
(the overlay a user adds) logs its parameters, metrics, figures and bundle there, read back with MLflow's client."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import ROOT, TINY_DATA

from visionapp.deploy.local import free_ports
from visionapp.manifest import CARD_FILE

mlflow = pytest.importorskip("mlflow")  # the track extra (in dev)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tracking(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """make mlflow on a free port with its store in a temporary folder; make mlflow-stop after."""
    store = tmp_path_factory.mktemp("mlflow")
    make = ["make", "-s", f"MLFLOW_PORT={free_ports(1)[0]}", f"MLFLOW_DIR={store}"]
    r = subprocess.run([*make, "mlflow"], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    url = r.stdout.split("MLFLOW_TRACKING_URI=")[1].split()[0]
    yield url
    subprocess.run([*make, "mlflow-stop"], cwd=ROOT, capture_output=True, timeout=60)
    assert not (store / "server.pid").exists()


def test_a_run_with_the_overlay_is_in_mlflow_with_its_figures_and_bundle(tracking: str, tmp_path: Path) -> None:
    args = [f"--data.init_args.root={tmp_path / 'shapes'}", *TINY_DATA, "--data.init_args.num_train=150",
            "--data.init_args.num_val=30", "--data.init_args.num_test=30", "--model.weights=null",
            "--trainer.max_epochs=1", "--trainer.log_every_n_steps=1", f"--runs_dir={tmp_path / 'runs'}",
            "--run_name=tracked"]  # fmt: skip
    r = subprocess.run(["make", "-s", "train", "CONFIG=configs/mlflow.yaml", f"ARGS={' '.join(args)}"], cwd=ROOT,
                       env={**os.environ, "MLFLOW_TRACKING_URI": tracking}, capture_output=True, text=True,
                       timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = tmp_path / "runs" / "tracked"
    metrics = json.loads((run_dir / "metrics.json").read_text())

    client = mlflow.MlflowClient(tracking)
    experiment = client.get_experiment_by_name("visionapp")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    assert run.data.params["arch"] == "resnet18"  # the model's hyperparameters, through Lightning
    history = client.get_metric_history(run.info.run_id, "train/loss")  # every logged step, through Lightning
    assert len(history) >= 4 and all(m.value > 0 for m in history)  # 150 images, batches of 32
    figures = run.data.metrics  # metrics.json's figures, after the run was written
    assert figures["run.test_acc"] == pytest.approx(metrics["test_acc"])
    assert figures["run.calibration.ece_after"] == pytest.approx(metrics["calibration"]["ece_after"])
    assert figures["run.ood.auroc_far"] == pytest.approx(metrics["ood"]["auroc_far"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metrics.json", "report.html", "config.yaml", "reliability.png", "bundle"} <= artifacts, artifacts
    bundle = {a.path for a in client.list_artifacts(run.info.run_id, "bundle")}
    assert {"bundle/model.json", "bundle/model.pt", f"bundle/{CARD_FILE}"} <= bundle, bundle
    assert run.data.tags["mlflow.note.content"] == (run_dir / "bundle" / CARD_FILE).read_text()
    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="metrics.json",
                                                tracking_uri=tracking, dst_path=str(tmp_path / "dl"))  # fmt: skip
    assert json.loads(Path(local).read_text()) == metrics


def test_without_a_tracking_uri_a_run_logs_to_a_local_sqlite_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """configs/mlflow.yaml with no MLFLOW_TRACKING_URI: the logger gets runs_dir's SQLite store and artifact folder
    (MLflow 3 refuses Lightning's default file store), and a metric logged there is read back from it."""
    from jsonargparse import Namespace
    from lightning.pytorch.loggers import MLFlowLogger

    from visionapp.train.track import local_tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    init = Namespace(experiment_name="visionapp", tracking_uri=None, artifact_location=None)
    configured = Namespace(class_path="lightning.pytorch.loggers.MLFlowLogger", init_args=init)
    local_tracking([configured], tmp_path / "runs")
    assert configured.init_args.tracking_uri == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    logger = MLFlowLogger(**vars(configured.init_args))
    logger.log_metrics({"run.test_acc": 0.5})
    logger.finalize("success")
    client = mlflow.MlflowClient(configured.init_args.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("visionapp").experiment_id])
    assert run.data.metrics["run.test_acc"] == 0.5 and (tmp_path / "runs" / "mlflow.db").is_file()
