"""The benchmarks run on a tiny setting and write their keys (their figures are not asserted: timing
thresholds have no place in tests on shared machines)."""

import json
import math
from pathlib import Path

import pytest
from helpers import EXPLAIN_CONFIG, ROOT

from visionapp.bench import __main__ as bench_run
from visionapp.bench import serve as serve_bench
from visionapp.bench import train as train_bench
from visionapp.deploy.archive import build_archives

TINY_TRAIN = ["--image-size", "48", "--num-train", "160", "--steps", "3", "--warmup", "1"]


def test_input_scan_times_each_step_of_the_input(tmp_path: Path) -> None:
    out = tmp_path / "scan.json"
    args = ["--root", str(tmp_path / "shapes"), *TINY_TRAIN, "--input-scan", "0", "1", "--out", str(out)]
    assert train_bench.main(args) == 0
    scan = json.loads(out.read_text())["input_scan"]
    steps = {"decode", "augment", "read_and_augment_from_cache", "augment_planar_uint8"}
    assert all(scan[f"{k}_ms_per_image"] > 0 for k in steps)
    assert scan["workers_0"]["images_per_s"] > 0 and scan["workers_1"]["worker_cores"] > 0


@pytest.mark.slow
@pytest.mark.timeout(1800)  # its worker's first test to need the shared run: the timeout counts that training too
def test_make_bench_writes_every_key(trained_run: Path, tmp_path: Path) -> None:
    """`make bench`'s script end to end on a tiny setting: the forms exported on copies of the bundle, real
    TorchServe servers (ours and the stock handler) and KServe's. AOTInductor is left out here (test_export
    compiles it): the bench treats every form alike."""
    out = tmp_path / "results.json"
    args = ["--run", str(trained_run), "--rounds", "1", "--requests", "4", "--concurrency", "1", "8",
            "--serve-warmup", "8", "--serve-explanations", "1", "--serve-explain-method", "layer_gradcam",
            "--serve-saturate", "96",
            "--train-root", str(tmp_path / "shapes"),
            "--out", str(out),
            "--report", str(tmp_path / "report.md"), "--forms", "onnx", "onnx-int8"]  # fmt: skip
    args += [a.replace("--", "--train-", 1) for a in TINY_TRAIN]
    args += ["--train-reference-size", "64", "--train-reference-steps", "3"]  # the 224 px part, tiny
    args += ["--predict-images", "12", "--predict-batch-size", "4"]
    assert bench_run.main(args) == 0
    result = json.loads(out.read_text())
    for key in bench_run.GOALS:
        assert math.isfinite(result[key]) and result[key] >= 0, key
        assert key in result["goals"]
    assert result["machine"]["cores"] >= 1 and result["versions"]["torchserve"] != "not installed"
    forms = result["forms"]  # at the model's own size: each form's check on the run's test split, its forward
    assert set(forms["forms"]) == {"eager", "onnx", "onnx-int8"} and "agreement" in forms["forms"]["onnx-int8"]
    assert set(forms["forward_ms"]) == {"eager", "eager_channels_last", "onnx", "onnx-int8"}
    train = result["train"]  # the training part: every loop and loader measured, the workers' loader on the CPU
    assert set(train["images_per_second"]) == {"ceiling", "loop", "lightning", "input", "loop_files",
                                               "input_files", "loop_device", "input_device"}  # fmt: skip
    assert train["settings"]["loader"] == "workers" and all(v > 0 for v in train["images_per_second"].values())
    assert train.keys() >= {"train.loop_vs_ceiling", "train.lightning_vs_loop", "train.input_vs_input_files"}
    assert set(result["train_224px"]["images_per_second"]) == {"input", "loop", "input_files", "loop_files",
                                                               "input_device", "loop_device"}  # fmt: skip
    part = result["serve_224px"]
    assert part["settings"]["image_size"] == 224 and "serve" not in result  # the same weights, served at 224 px
    serve = part["median"]
    assert set(serve) == {"inprocess", "ours", "stock", "kserve", "slim"}
    assert set(part["started"]) == {"ours", "stock", "kserve", "slim"}  # each one's start and memory
    assert all(d["ready_seconds"] > 0 and d["rss_mb"] > 0 for d in part["started"].values())
    assert part["default_form"] in ("eager", "onnx", "onnx-int8") and set(part["forward_ms"]["onnx"]) == {"b1", "b8"}
    assert 1 <= serve["kserve"]["c8"]["batch"] <= 8  # KServe's server batches as the model config says
    assert part["during_explanations"]["kserve"]["ready"]["p99_ms"] > 0  # probes answered while saturated
    assert serve["kserve"]["c8"]["cores_busy"]["worker"] > 0  # its one process, found
    for name in ("ours", "kserve"):  # predictions measured while explanations ran, on both of our servers
        during = part["during_explanations"][name]
        assert during["during_requests"] >= 1 and during["explained"] == during["explanations"] == 1, during
    for contender in serve.values():
        assert set(contender["latency_ms"]) == {"p50", "p90", "p99"}
        assert contender["c1"]["images_per_s"] > 0 and contender["c8"]["images_per_s"] > 0
    for server in ("ours", "stock"):  # each server's CPU is found and told apart: its frontend and its worker
        busy = serve[server]["c8"]["cores_busy"]
        assert busy["frontend"] > 0 and busy["worker"] > 0, busy
    assert set(result["explain"]["methods"]) == {"integrated_gradients", "gradient_shap", "occlusion", "layer_gradcam"}
    report = (tmp_path / "report.md").read_text()  # the docs' tables come from these results, every goal among them
    for key in bench_run.GOALS:
        assert f"| `{key}` | **{result[key]:.3f}** |" in report
    assert "## Serving at the 224 px" in report and "throughput at concurrency 8" in report
    assert "| `slim` |" in report  # its start and memory beside the others'
    assert "## Capacity plan" in report and "| ours, 224 px |" in report
    assert "## The model's forms" in report and "| own size: onnx-int8" in report
    predict = result["predict_224px"]
    assert set(predict["images_per_second"]) == {"predict", "forward", "served"} and "## Predict" in report
    assert predict["settings"]["images"] == 12 and predict["settings"]["image_size"] == 224
    cost = predict["cost"]  # what bounds predict against the forward alone: the decoding it must hide
    assert cost["decode_core_ms"] > 0 and 0 < cost["overlap_bound"] < 1 and "predict can reach at most" in report


def test_results_written_before_a_key_was_renamed_are_read_under_the_new_name() -> None:
    from visionapp.bench.markdown import upgrade

    old = {
        "train.device_loader_vs_worker_loader_224px": 2.36,
        "goals": {"train.device_loader_vs_worker_loader_224px": {}},
    }
    new = upgrade(old)
    assert (
        new["train.cache_loader_vs_file_loader_224px"] == 2.36
        and "train.cache_loader_vs_file_loader_224px" in new["goals"]
    )


@pytest.mark.slow
def test_serve_bench_variant_is_one_more_contender(trained_run: Path, tmp_path: Path) -> None:
    """--variant starts one more server with other make variables and measures it in the same rounds, with the
    batches TorchServe formed: here a .mar archived with another model config (batches of at most 2), which the
    batches it forms must show. The servers make bench covers are skipped."""
    config = tmp_path / "batch2.yaml"
    config.write_text((ROOT / "serve" / "model-config.yaml").read_text().replace("batchSize: 8", "batchSize: 2"))
    build_archives(trained_run / "bundle", name="classifier", out=tmp_path / "store2", model_config=config,
                   explain_config=EXPLAIN_CONFIG)  # fmt: skip
    image = next((Path(json.loads((trained_run / "metrics.json").read_text())["data_root"]) / "test").rglob("*.png"))
    out = tmp_path / "serve.json"
    args = ["--bundle", str(trained_run / "bundle"), "--image", str(image), "--rounds", "1",
            "--requests", "4", "--warmup", "8", "--concurrency", "8",
            "--variant", f"batch2:MODEL_STORE={tmp_path / 'store2'}", "--forms", "--skip", "stock", "kserve", "slim",
            "--out", str(out)]  # fmt: skip
    assert serve_bench.main(args) == 0
    result = json.loads(out.read_text())
    assert list(result["median"]) == ["inprocess", "ours", "batch2"]
    assert "serve.default_form_vs_stock_c8" not in result and result["default_form"] == "eager"
    assert 1 <= result["median"]["ours"]["c8"]["batch"] <= 8
    assert 1 <= result["median"]["batch2"]["c8"]["batch"] <= 2
    assert result["settings"]["variants"]["batch2"] == [f"MODEL_STORE={tmp_path / 'store2'}"]


def test_serve_bench_resizes_only_what_takes_any_size(tmp_path: Path) -> None:
    """--image-size serves a CNN's weights at another size (test_make_bench); not a ViT's, whose position
    embeddings fix its size."""
    vit = tmp_path / "vit"
    vit.mkdir()
    meta = {"arch": "vit_b_16", "image_size": 64, "model_kwargs": {"image_size": 64}}
    (vit / "model.json").write_text(json.dumps(meta))
    with pytest.raises(SystemExit, match="vit_b_16 is built for"):
        serve_bench.check_resizable(vit, 224)


@pytest.mark.parametrize("spec", ["nocolon", "ours:TS_LOG_CONFIG=", ":A=1", "x:NOEQUALS"])
def test_serve_bench_variant_refuses_a_bad_spec(spec: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        serve_bench.parser().parse_args(["--image", "x.png", "--variant", spec])
    assert "NAME:VAR=VALUE" in capsys.readouterr().err


def test_train_bench_input_scan(tmp_path: Path) -> None:
    out = tmp_path / "scan.json"
    args = ["--root", str(tmp_path / "shapes"), *TINY_TRAIN, "--input-scan", "1", "2", "--out", str(out)]
    assert train_bench.main(args) == 0
    scan = json.loads(out.read_text())["input_scan"]
    assert scan["decode_ms_per_image"] > 0 and scan["augment_ms_per_image"] > 0
    assert all(scan[f"workers_{n}"]["images_per_s"] > 0 for n in (1, 2))


@pytest.mark.slow
def test_the_bench_stages_a_knn_bundle_whole(trained_run: Path, tmp_path: Path) -> None:
    """The serve bench's staged copy carries every file the OOD record names (knn's training features), so a knn
    bundle (the default run's choice) loads and answers with its score there."""
    import shutil

    import numpy as np
    import torch

    from visionapp.bundle import load_bundle
    from visionapp.ood import FEATURES_FILE

    bundle = tmp_path / "run" / "bundle"
    shutil.copytree(trained_run / "bundle", bundle)
    meta = json.loads((bundle / "model.json").read_text())
    meta["ood"] = {"method": "knn", "threshold": 0.5, "accept": 0.95, "k": 3, "features": FEATURES_FILE}
    (bundle / "model.json").write_text(json.dumps(meta))
    np.save(bundle / FEATURES_FILE, torch.nn.functional.normalize(torch.randn(20, 512), dim=1).half().numpy())
    staged = serve_bench.staged_bundle(bundle, tmp_path / "staged" / "bundle", image_size=224)
    b = load_bundle(staged)
    _, scores, flags = b.answer(torch.zeros(1, 3, 224, 224))
    assert b.ood is not None and b.ood.method == "knn" and scores is not None and flags is not None
