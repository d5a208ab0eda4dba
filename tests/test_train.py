"""The training stage through the real LightningCLI entry point."""

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import run_fit

from visionapp.bundle import load_bundle
from visionapp.train.data import LoaderConfig, ShapesDataModule
from visionapp.train.module import ImageClassifier

METRIC_KEYS = {
    "arch",
    "dataset",
    "num_classes",
    "pretrained",
    "val_acc",
    "test_acc",
    "epochs",
    "wall_seconds",
    "train_images_per_second",
}


@pytest.mark.parametrize("loader", ["auto", "device"])
def test_fit_fast_dev_run_writes_a_run_directory(tmp_path: Path, shapes_root: Path, loader: str) -> None:
    run = run_fit(
        tmp_path / "runs", shapes_root, "--trainer.fast_dev_run=true", f"--data.init_args.loader.mode={loader}"
    )
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics.keys() >= METRIC_KEYS
    assert metrics["pretrained"] is False and "weights=null" in metrics["pretrained_reason"]
    # auto on the CPU: workers cropping from the cache; device: whole batches cropped in this process
    assert metrics["input_pipeline"] == ("workers" if loader == "auto" else "device")
    assert (run / "confusion_matrix.png").stat().st_size > 1000
    assert (run / "bundle" / "model.pt").is_file()
    assert metrics["calibration"].keys() >= {"temperature", "ece_before", "ece_after", "nll_before", "nll_after"}
    assert (run / "reliability.png").is_file()
    page = (run / "report.html").read_text()  # one self-contained page: images inlined
    for section in ("Metrics", "Calibration", "Per class", "Most confident mistakes", "Versions"):
        assert f"<h2>{section}" in page, section
    assert page.count("data:image/png;base64,") >= 2 and 'src="http' not in page
    assert (
        json.loads((run / "bundle" / "model.json").read_text())["temperature"] == metrics["calibration"]["temperature"]
    )
    _check_model_card(run, metrics)
    assert "bundle/MODEL_CARD.md" in page


def _check_model_card(run: Path, metrics: dict) -> None:
    """The bundle's MODEL_CARD.md: Hugging Face's layout (YAML metadata, then sections) with metrics.json's figures."""
    text = (run / "bundle" / "MODEL_CARD.md").read_text()
    _, front, body = text.split("---\n", 2)
    meta = yaml.safe_load(front)
    result = meta["model-index"][0]["results"][0]
    assert meta["pipeline_tag"] == "image-classification" and meta["datasets"] == [metrics["dataset"]]
    assert result["metrics"][0]["value"] == round(metrics["test_acc"], 4)
    for section in ("Intended use", "Data", "Training", "Results", "Limitations", "Versions"):
        assert f"\n## {section}\n" in body, section
    sizes = metrics["split_sizes"]
    assert f"train {sizes['train']} images, val {sizes['val']} images, test {sizes['test']} images" in body
    for name, acc in metrics["test_acc_per_class"].items():
        assert f"| {name} | {acc:.4f} |" in body
    calibration, ood = metrics["calibration"], metrics["ood"]
    assert f"{calibration['ece_before']:.4f} before, {calibration['ece_after']:.4f} after" in body
    assert f"method **{ood['method']}**" in body and f"threshold {ood['threshold']} " in body
    for name in ood["sets"]:
        assert f"{name} {ood[f'auroc_{name}']:.4f}" in body
    assert f"{metrics['epochs']} epochs" in body and f"torch {metrics['versions']['torch']}" in body


@pytest.mark.slow
def test_short_training_beats_chance_by_a_wide_margin(trained_run: Path) -> None:
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert metrics.keys() >= METRIC_KEYS
    # chance is 0.2 with five classes; a tiny run's accuracy differs from CPU to CPU (0.5-0.7 seen): twice chance
    assert metrics["test_acc"] > 0.4, metrics
    assert (trained_run / "config.yaml").is_file()
    assert (trained_run / "checkpoints" / "last.ckpt").is_file()
    meta = json.loads((trained_run / "bundle" / "model.json").read_text())
    assert meta["class_names"] == ["circle", "cross", "square", "star", "triangle"]
    assert meta["image_size"] == 64 and meta["pretrained"]["pretrained"] is False


@pytest.mark.slow
def test_bundle_round_trip_gives_the_checkpoints_logits(trained_run: Path, shapes_root: Path) -> None:
    metrics = json.loads((trained_run / "metrics.json").read_text())
    module = ImageClassifier.load_from_checkpoint(metrics["best_checkpoint"], map_location="cpu").eval()
    bundle = load_bundle(trained_run / "bundle")
    dm = ShapesDataModule(shapes_root, image_size=64, loader=LoaderConfig(num_workers=0), batch_size=16)
    dm.setup("test")
    x, _ = dm.on_after_batch_transfer(next(iter(dm.test_dataloader())))
    with torch.no_grad():
        torch.testing.assert_close(bundle.model(x), module(x), rtol=0, atol=1e-5)
    assert bundle.class_names == module.class_names
    assert bundle.transform.image_size == 64


def test_resume_from_checkpoint(tmp_path: Path, shapes_root: Path) -> None:
    run = run_fit(
        tmp_path / "runs",
        shapes_root,
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        "--trainer.limit_test_batches=1",
    )
    with pytest.warns(UserWarning, match="schedule is stretched to end at step 4"):  # it was planned for 2 steps
        resumed = run_fit(
            tmp_path / "runs2",
            shapes_root,
            "--trainer.max_epochs=2",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1",
            "--trainer.limit_test_batches=1",
            "--trainer.log_every_n_steps=1",
            f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
        )
    assert json.loads((resumed / "metrics.json").read_text())["global_steps"] == 4
    # Training longer trains: the LR of the added steps is not the finished schedule's 0, and the weights move.
    lrs = [float(r["lr-AdamW"]) for r in csv.DictReader((resumed / "metrics.csv").open()) if r.get("lr-AdamW")]
    assert lrs and min(lrs) > 0, lrs
    before = torch.load(run / "bundle" / "model.pt", weights_only=True)
    after = torch.load(resumed / "bundle" / "model.pt", weights_only=True)
    assert not torch.equal(before["fc.weight"], after["fc.weight"])
    # What only a resume gives (a fresh 2-epoch run also ends at step 4): the first epoch is not trained again,
    # and the optimizer comes back with its state (AdamW's step count goes on from the checkpoint's 2).
    rows = list(csv.DictReader((resumed / "metrics.csv").open()))
    trained_epochs = {int(float(r["epoch"])) for r in rows if r.get("train/acc")}  # logged once an epoch
    assert trained_epochs == {1}, trained_epochs
    optimizer = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=False)["optimizer_states"][0]
    assert {int(state["step"]) for state in optimizer["state"].values()} == {4}


@pytest.mark.gpu
def test_on_a_gpu_fit_uses_mixed_precision_and_channels_last(tmp_path: Path, shapes_root: Path) -> None:
    run = run_fit(tmp_path / "runs", shapes_root, "--trainer.fast_dev_run=true")
    metrics = json.loads((run / "metrics.json").read_text())
    expected = "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    assert metrics["precision"] == expected and metrics["device"] != "cpu"
    assert metrics["input_pipeline"] == "device"  # loader: auto on a GPU: the cache fits, batches cropped there
