"""Runs in the user's tracker: make mlflow starts MLflow's real tracking server; a fit with configs/mlflow.yaml
(the overlay a user adds) logs its parameters, metrics, figures and bundle there, read back with MLflow's client;
the bundle is registered as a model that answers as the bundle does and that make serves from the registry."""

from __future__ import annotations

import base64
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import ROOT, TINY_DATA

from visionapp.bundle import load_bundle, run_test_images
from visionapp.client.api import call
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


@pytest.fixture(scope="module")
def tracked(tracking: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short make train with configs/mlflow.yaml against the server: the run's folder."""
    tmp = tmp_path_factory.mktemp("tracked")
    args = [f"--data.init_args.root={tmp / 'shapes'}", *TINY_DATA, "--data.init_args.num_train=150",
            "--data.init_args.num_val=30", "--data.init_args.num_test=30", "--model.weights=null",
            "--trainer.max_epochs=1", "--trainer.log_every_n_steps=1", f"--runs_dir={tmp / 'runs'}",
            "--run_name=tracked"]  # fmt: skip
    r = subprocess.run(["make", "-s", "train", "CONFIG=configs/mlflow.yaml", f"ARGS={' '.join(args)}"], cwd=ROOT,
                       env={**os.environ, "MLFLOW_TRACKING_URI": tracking}, capture_output=True, text=True,
                       timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp / "runs" / "tracked"


def test_a_run_with_the_overlay_is_in_mlflow_with_its_figures_and_model(tracking: str, tracked: Path) -> None:
    run_dir, tmp = tracked, tracked.parent.parent
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
    assert {"metrics.json", "report.html", "config.yaml", "reliability.png", CARD_FILE} <= artifacts, artifacts
    assert run.data.tags["mlflow.note.content"] == (run_dir / "bundle" / CARD_FILE).read_text()
    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="metrics.json",
                                                tracking_uri=tracking, dst_path=str(tmp / "dl"))  # fmt: skip
    assert json.loads(Path(local).read_text()) == metrics
    # the bundle as a registered model: version 1 of "classifier" (the first in this server), from this run,
    # the run's figures as its tags and the card as its description
    (version,) = client.search_model_versions("name = 'classifier'")
    assert version.version == "1" and version.run_id == run.info.run_id
    assert float(version.tags["test_acc"]) == pytest.approx(metrics["test_acc"], abs=1e-6)
    assert version.tags["run"] == "tracked" and version.description == (run_dir / "bundle" / CARD_FILE).read_text()
    assert run.data.tags["visionapp.registered_model"] == "models:/classifier/1"


def test_the_registered_model_answers_as_the_bundle_does(tracking: str, tracked: Path) -> None:
    """The registry's pyfunc, loaded by MLflow from the server: Bundle.answer's probabilities, OOD scores and flags
    for the run's test images."""
    import numpy as np
    import pandas as pd
    import torch

    files = run_test_images(tracked)[:12]
    mlflow.set_tracking_uri(tracking)
    model = mlflow.pyfunc.load_model("models:/classifier/1")
    answers = model.predict(pd.DataFrame({"image": [f.read_bytes() for f in files]}))
    bundle = load_bundle(tracked / "bundle", runtime="auto")
    probabilities, scores, flags = bundle.answer(torch.stack([bundle.transform.load(f) for f in files]))
    np.testing.assert_allclose(np.array(answers["probabilities"].tolist()), probabilities.numpy(), atol=1e-6)
    np.testing.assert_allclose(answers["ood_score"].to_numpy(float), scores.numpy(), atol=1e-6)
    assert answers["ood"].tolist() == flags.tolist()
    assert answers["label"].tolist() == [bundle.class_names[i] for i in probabilities.argmax(1).tolist()]


def test_make_serves_a_registry_version_named_after_it(tracking: str, tracked: Path, tmp_path: Path) -> None:
    """MODEL_URI=models:/classifier/1: make fetches the version once into REGISTRY_DIR and serves it as a run
    (KServe's server here; make archive takes the same bundle), its version named after the registry's; a
    version that does not exist stops make with the registry's own words."""
    port = free_ports(1)[0]
    make = ["make", "-s", "MODEL_URI=models:/classifier/1", f"REGISTRY_DIR={tmp_path / 'registry'}",
            "SERVER=kserve", f"INFERENCE_PORT={port}", f"SERVE_DIR={tmp_path / 'serve'}"]  # fmt: skip
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking}
    fetched = tmp_path / "registry" / "classifier-v1" / "bundle"
    dry = subprocess.run([*make, "-n", "archive"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0 and f"--bundle {fetched}" in dry.stdout, dry.stdout + dry.stderr
    assert (fetched / "model.pt").read_bytes() == (tracked / "bundle" / "model.pt").read_bytes()
    r = subprocess.run([*make, "serve-bg"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    try:
        assert r.returncode == 0, r.stdout + r.stderr
        image = run_test_images(tracked)[0]
        body = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                            "data": [base64.b64encode(image.read_bytes()).decode()]}]}  # fmt: skip
        # the client's direct opener: urlopen's global one keeps whatever proxy an earlier test's environment named
        url = f"http://127.0.0.1:{port}/v2/models/classifier/infer"
        status, raw = call(url, "", json.dumps(body).encode(), "application/json")
        assert status == 200, raw
        answer = json.loads(raw)
        assert answer["model_version"] == "classifier-v1"  # the registry's version, not a run folder's name
        bundle = load_bundle(tracked / "bundle", runtime="auto")
        (probabilities,) = bundle.answer(bundle.transform.load(image)[None])[0]
        labels = {o["name"]: o["data"] for o in answer["outputs"]}["labels"]
        assert labels[0] == bundle.class_names[int(probabilities.argmax())]
    finally:
        subprocess.run([*make, "stop"], cwd=ROOT, env=env, capture_output=True, timeout=60)
    missing = subprocess.run([*make[:-3], "MODEL_URI=models:/classifier/7", "-n", "archive"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert missing.returncode != 0 and "models:/classifier/7 was not fetched" in missing.stderr, missing.stderr


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
