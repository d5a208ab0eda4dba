"""Your own photos through the whole pipeline, as the README offers it: JPEGs of varied sizes, sideways with an
EXIF orientation, grayscale and CMYK, trained with `make train CONFIG=configs/folder.yaml` past the backbone's
thaw, explained with explain/heatmap.py, packed with `make archive` and answered by the real TorchServe."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT
from PIL import Image

from visionapp import shapes
from visionapp.bundle import load_bundle
from visionapp.deploy.local import LocalServer

pytestmark = pytest.mark.slow


def test_photos_train_explain_archive_and_serve(photos_root: Path, tmp_path: Path) -> None:
    runs, store = tmp_path / "runs", tmp_path / "model_store"
    elsewhere = tmp_path / "elsewhere"  # the user's own images of no class, to measure the OOD score on
    elsewhere.mkdir()
    for i in range(6):
        shapes.render_other("plasma", i, seed=3, size=80).save(elsewhere / f"img_{i}.jpg")
    args = (
        f"--data.init_args.root={photos_root} --data.init_args.image_size=64 --data.init_args.batch_size=8 "
        f"--data.init_args.loader.num_workers=0 --model.weights=null --trainer.max_epochs=2 --runs_dir={runs} "
        f"--data.init_args.ood_root={elsewhere}"
    )
    proc = subprocess.run(
        ["make", "-s", "train", "CONFIG=configs/folder.yaml", f"ARGS={args}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = (runs / "latest").resolve()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and metrics["class_names"] == ["circle", "star"]
    ood = metrics["ood"]  # no training outliers in a folder: the baseline served, measured on the user's folder
    assert ood["method"] == "msp" and ood["sets"] == {"ood": 6} and 0 <= ood["methods"]["knn"]["auroc_ood"] <= 1
    assert metrics["test_split"].startswith("test: 15% of")  # no root/test: held out of train, and said so
    test_files = (run / "test_files.txt").read_text().split()
    assert test_files and all("/train/" in f for f in test_files)

    heatmaps = tmp_path / "heatmaps"
    proc = subprocess.run(
        [sys.executable, "explain/heatmap.py", "--bundle", str(run / "bundle"), "--images", str(photos_root / "val"),
         "--method", "layer_gradcam", "--out", str(heatmaps)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    cmyk = photos_root / "val" / "star" / "IMG_0002.jpg"
    sideways = photos_root / "val" / "star" / "IMG_0003.jpg"
    assert Image.open(cmyk).mode == "CMYK" and Image.open(sideways).getexif()[0x0112] == 6
    assert len(list(heatmaps.glob("*.png"))) == len(list((photos_root / "val").rglob("*.jpg")))

    proc = subprocess.run(
        ["make", "-s", "archive", f"RUN={run}", f"MODEL_STORE={store}", "EXPORT_ARGS=--forms onnx onnx-int8"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    int8 = json.loads((run / "bundle" / "model.json").read_text())["forms"]["cpu"]["onnx-int8"]
    assert int8["checked_images"] == len(test_files) and int8["passed"] == ("reason" not in int8)  # either way
    bundle = load_bundle(run / "bundle", runtime="auto")  # make archive exported first: the server runs this form
    with LocalServer(store, tmp_path / "serve", "classifier", f"RUN={run}") as server:
        for photo in (cmyk, sideways, photos_root / "val" / "circle" / "IMG_0001.jpg"):  # CMYK, EXIF, grayscale
            status, answer = server.post(photo.read_bytes())
            assert status == 200 and isinstance(answer, dict) and set(answer) == {"circle", "star"}, answer
            with torch.no_grad():
                probs = bundle.probabilities(bundle.transform.load(photo)[None])[0]
            for name, p in answer.items():
                assert p == pytest.approx(float(probs[bundle.class_names.index(name)]), abs=1e-4)
