"""The explain stage: Captum heatmaps from a bundle, and the measures of their quality."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visionapp.attribution.maps import explain
from visionapp.attribution.methods import METHODS
from visionapp.bundle import load_bundle
from visionapp.explain import heatmap, quality


def _test_image(trained_run: Path, cls: str = "star") -> Path:
    root = Path(json.loads((trained_run / "metrics.json").read_text())["data_root"])
    return sorted((root / "test" / cls).glob("*.png"))[0]


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_each_method_gives_a_finite_map_at_the_original_size(trained_run: Path, method: str) -> None:
    bundle = load_bundle(trained_run / "bundle")
    image = Image.open(_test_image(trained_run)).convert("RGB").resize((50, 80))  # not the model's size or aspect
    e = explain(bundle, image, method, ig_steps=8)
    assert e.attr_map.shape == (80, 50)
    assert np.isfinite(e.attr_map).all() and np.abs(e.attr_map).max() > 0
    assert e.predicted in bundle.class_names and 0 < e.probability <= 1


@pytest.mark.slow
def test_target_by_name(trained_run: Path) -> None:
    bundle = load_bundle(trained_run / "bundle")
    image = Image.open(_test_image(trained_run, "circle")).convert("RGB")
    e = explain(bundle, image, "layer_gradcam", target="triangle")
    assert e.target == "triangle" and 0 <= e.target_probability <= 1
    with pytest.raises(ValueError, match="circle, cross, square, star, triangle"):
        explain(bundle, image, "layer_gradcam", target="hexagon")


def test_localisation_metrics_on_a_known_case() -> None:
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[:, :2, :2] = True  # the top-left quarter is the object
    maps = torch.zeros(2, 4, 4)
    maps[0, 0, 0] = 3.0  # image 0: everything inside, maximum inside
    maps[0, 3, 3] = -5.0  # negative evidence does not count as mass
    maps[1, 0, 1], maps[1, 3, 3] = 1.0, 3.0  # image 1: a quarter of the mass inside, maximum outside
    assert quality.pointing_game(maps, masks) == pytest.approx(0.5)
    assert quality.mass_in_mask(maps, masks) == pytest.approx((1.0 + 0.25) / 2)


@pytest.mark.slow
def test_randomisation_check_separates_trained_from_random(trained_run: Path) -> None:
    bundle = load_bundle(trained_run / "bundle")
    x = torch.stack(
        [bundle.transform(Image.open(_test_image(trained_run, c)).convert("RGB")) for c in bundle.class_names]
    )
    target = bundle.model(x).argmax(1)
    from visionapp.attribution.maps import attribute

    trained = attribute(bundle.model, x, target, "integrated_gradients", ig_steps=16)
    random = attribute(quality.randomized_copy(bundle.model), x, target, "integrated_gradients", ig_steps=16)
    assert quality.spearman(trained, trained) == (pytest.approx(1.0), 0)
    rho, undefined = quality.spearman(trained, random)
    assert rho < 0.5 and undefined == 0
    flat = trained.clone()
    flat[0] = 0.0  # a constant map: no ranking; counted against the check, not taken as a correlation of 0
    assert quality.spearman(flat, random)[1] == 1


def test_unknown_method_and_missing_bundle_are_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        heatmap.main(["--images", "x.png", "--method", "lime"])
    assert (
        e.value.code == 2 and "integrated_gradients, gradient_shap, occlusion, layer_gradcam" in capsys.readouterr().err
    )
    with pytest.raises(SystemExit):
        heatmap.main(["--bundle", str(tmp_path), "--images", "x.png"])
    assert "is not a bundle" in capsys.readouterr().err


@pytest.mark.slow
def test_script_skips_bad_files_writes_the_rest_and_fails_at_the_end(trained_run: Path, tmp_path: Path) -> None:
    images = tmp_path / "in"
    images.mkdir()
    shutil.copy(_test_image(trained_run), images / "good.png")
    (images / "broken.jpg").write_text("not a jpeg")
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "explain/heatmap.py",
            "--bundle",
            str(trained_run / "bundle"),
            "--images",
            str(images),
            "--method",
            "layer_gradcam",
            "--target",
            "square",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr
    assert "broken.jpg" in proc.stderr
    png = out / "good_layer_gradcam.png"
    assert Image.open(png).size[0] > 600  # three panels


@pytest.mark.slow
def test_quality_report_has_every_key(trained_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("checkpoints"))
    report = quality.evaluate(run, samples=6, metric_samples=2, heatmaps=1)
    keys = set(quality.METRIC_KEYS)
    saved = json.loads((run / "explanations" / "quality.json").read_text())
    assert saved["methods"].keys() == set(METHODS)
    for entry in saved["methods"].values():
        assert entry.keys() == keys | {"randomization_passed"}
        assert all(np.isfinite(entry[k]) for k in keys if k != "randomization_spearman")
        assert entry["randomization_passed"] == (
            entry["randomization_spearman"] < 0.5 and not entry["randomization_undefined"]
        )
    assert report["ig50_vs_passes"]["ratio"] > 0
    assert len(list((run / "explanations" / "layer_gradcam").glob("*.png"))) == 1


@pytest.mark.slow
def test_quality_without_masks_skips_the_mask_metrics(trained_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("checkpoints"))
    src = Path(json.loads((run / "metrics.json").read_text())["data_root"]) / "test"
    for cls_dir in src.iterdir():  # the same images, as a user's folder without masks
        (tmp_path / "plain" / "test" / cls_dir.name).mkdir(parents=True)
        for f in sorted(cls_dir.glob("*.png"))[:2]:
            shutil.copy(f, tmp_path / "plain" / "test" / cls_dir.name / f.name)
    plain = sorted(str(f) for f in (tmp_path / "plain" / "test").rglob("*.png"))
    (run / "test_files.txt").write_text("\n".join(plain) + "\n")  # the run's test split, as fit records it
    report = quality.evaluate(run, samples=4, metric_samples=2, methods=("layer_gradcam",), heatmaps=0)
    assert report["methods"]["layer_gradcam"]["pointing_game"] is None
    assert report["methods"]["layer_gradcam"]["infidelity"] is not None


@pytest.mark.slow
def test_make_explain_gives_the_same_table_twice(trained_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("checkpoints"))
    tables = []
    for _ in range(2):
        report = quality.evaluate(run, samples=6, metric_samples=2, heatmaps=0, methods=("gradient_shap", "occlusion"))
        tables.append(  # rounded: the float sums of a multithreaded backward may differ in the last digits
            {
                m: {k: round(v, 5) for k, v in e.items() if k != "seconds_per_image"}
                for m, e in report["methods"].items()
            }
        )
    assert json.dumps(tables[0]) == json.dumps(tables[1])  # gradient SHAP's random baselines included: seeded per call


@pytest.mark.slow
def test_the_run_report_shows_mistakes_and_renders_in_a_browser(trained_run: Path, tmp_path: Path) -> None:
    from visionapp import run_report

    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("checkpoints"))
    page = run_report.build(run).read_text()
    mistakes = run_report.confident_mistakes(run)
    assert mistakes and all(m["truth"] != m["predicted"] for m in mistakes)  # a 5-epoch model makes some
    assert [m["probability"] for m in mistakes] == sorted((m["probability"] for m in mistakes), reverse=True)
    assert f"is {mistakes[0]['truth']}, predicted {mistakes[0]['predicted']}" in page
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no Chromium here to render the page (apt-get install chromium)")
    shot = tmp_path / "report.png"
    subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
         f"--screenshot={shot}", "--window-size=1100,2400", (run / "report.html").as_uri()],
        capture_output=True, timeout=120, check=True,
    )  # fmt: skip
    rendered = Image.open(shot).convert("L")
    assert rendered.size == (1100, 2400) and len(set(rendered.getdata())) > 50  # drawn, not a blank page
