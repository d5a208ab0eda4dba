"""The model's forms (make export): AOTInductor, ONNX and int8 ONNX, each checked against the eager model,
recorded with its figures, loaded in process (`load_bundle(..., runtime=...)`) and served by both servers; the
eager model wherever a form does not fit."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import MODEL_CONFIG, ROOT, closure, post_with_headers, real_server, requirements

from visionapp.bundle import load_bundle
from visionapp.decode import load_image
from visionapp.deploy.archive import build_archive
from visionapp.deploy.export import export_bundle
from visionapp.deploy.local import LocalServer
from visionapp.manifest import TEST_FILES, file_sha256
from visionapp.slim import load_slim

pytestmark = pytest.mark.slow


def copy_run(run: Path, to: Path) -> Path:
    """A run directory holding a copy of `run`'s bundle, its test split's file list and its metrics (which name its
    data: the validation images int8 is calibrated on, the OOD sets)."""
    to.mkdir(parents=True)
    shutil.copytree(run / "bundle", to / "bundle")
    for name in (TEST_FILES, "metrics.json"):
        shutil.copy2(run / name, to / name)
    return to


# The tiny run (64 px, a few epochs) is far from the default run's accuracy, so int8's answers move more than on a
# trained model: its check runs with wider limits here (a user's flags), so that the int8 form is served and tested
# on every CPU. The default limits are tested against the figures they are computed from, whichever way they fall.
LOOSE_INT8 = "--int8-agreement 0.8 --int8-accuracy-points 10 --int8-auroc 0.2"


@pytest.fixture(scope="module")
def exported(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the trained run, exported by `make export` as a user runs it."""
    run = copy_run(trained_run, tmp_path_factory.mktemp("exported") / "run")
    r = subprocess.run(["make", "-s", "export", f"RUN={run}", f"EXPORT_ARGS={LOOSE_INT8}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=900)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert "default form on cpu:" in r.stdout
    return run


def forms_of(run: Path) -> dict:
    return json.loads((run / "bundle" / "model.json").read_text())["forms"]["cpu"]


def test_export_records_each_form_with_its_check(exported: Path) -> None:
    records = forms_of(exported)
    assert set(records) == {"eager", "aoti", "onnx", "onnx-int8"}
    eager = records.pop("eager")  # timed beside them, in the faster of its layouts
    assert eager["images_per_s"] == max(eager["nchw_images_per_s"], eager["channels_last_images_per_s"])
    assert eager["channels_last"] == (eager["channels_last_images_per_s"] > eager["nchw_images_per_s"])
    for name, record in records.items():
        assert record["passed"], (name, record.get("reason"))
        assert record["outputs"] == ["logits", "features"] and record["images_per_s"] > 0 and record["vs_eager"] > 0
        assert record["sha256"] == file_sha256(exported / "bundle" / record["file"])
    for name in ("aoti", "onnx"):
        assert records[name]["max_abs_diff"] <= 1e-4 and records[name]["checked_images"] == 8
    aoti = records["aoti"]
    assert aoti["torch"] == torch.__version__ and aoti["batch"] == [1, 8] and aoti["options"]["freezing"]
    assert aoti["channels_last"] and aoti["cpu_isa"]
    int8 = records["onnx-int8"]
    assert int8["checked_images"] == len((exported / TEST_FILES).read_text().split())  # the whole test split
    assert set(int8["auroc"]) == set(int8["eager_auroc"]) == {"near", "far"}  # the run's OOD sets
    assert int8["limits"]["agreement"] == 0.8 and "ood_threshold" in int8
    default = load_bundle(exported / "bundle", runtime="auto")
    records["eager"] = eager
    assert default.form == max(records, key=lambda n: records[n]["images_per_s"])  # the fastest that passed
    assert default.channels_last == (default.form == "eager" and eager["channels_last"])
    assert default.form_note.startswith(default.form) and "fastest" in default.form_note


def test_the_default_int8_check_follows_its_figures(exported: Path) -> None:
    """int8's check with the default limits, again on the same run's images: it passes exactly where its figures
    are within them (a tiny run falls either way), and its figures are those make export recorded."""
    from visionapp.deploy.export import INT8_CHECKS, check_int8, run_images
    from visionapp.forms import WithFeatures

    b = load_bundle(exported / "bundle")
    images = run_images(b, exported / "bundle", 8, 300, int8=True)
    runner = load_bundle(exported / "bundle", runtime="onnx-int8").runner
    assert runner is not None and images.limits == INT8_CHECKS
    record = check_int8(b, WithFeatures(b.model).eval(), runner, images)
    assert record["agreement"] == pytest.approx(forms_of(exported)["onnx-int8"]["agreement"])
    aurocs = all(abs(v - record["eager_auroc"][k]) <= INT8_CHECKS["auroc"] for k, v in record["auroc"].items())
    accuracy = abs(record["accuracy"] - record["eager_accuracy"]) * 100 <= INT8_CHECKS["accuracy_points"]
    within = record["agreement"] >= INT8_CHECKS["agreement"] and aurocs and accuracy
    assert record["passed"] == within and (within or record["reason"])


def test_every_form_answers_as_the_eager_model(exported: Path) -> None:
    """fp32 forms: logits and features within 1e-4 of eager for batches inside and past the exported range; int8:
    the same class for nearly every image, and a knn bundle's OOD flag from the form's own features."""
    eager = load_bundle(exported / "bundle")
    files = (exported / TEST_FILES).read_text().split()
    x = torch.stack([eager.transform.load(f) for f in files[:20]])
    with torch.inference_mode():
        expected = eager.run(x)
        for name in ("aoti", "onnx"):
            form = load_bundle(exported / "bundle", runtime=name)
            assert form.form == name
            for n in (1, 3, 8, 20):  # 20: past the AOTInductor package's batch range, run in chunks of 8
                logits, features = form.run(x[:n])
                assert torch.allclose(logits, expected[0][:n], atol=1e-4)
                assert torch.allclose(features, expected[1][:n], atol=1e-4)
            assert torch.allclose(form.answer(x)[0], eager.answer(x)[0], atol=1e-4)
        int8 = load_bundle(exported / "bundle", runtime="onnx-int8")
        probs, scores, flags = int8.answer(x)
        assert (probs.argmax(1) == expected[0].argmax(1)).float().mean() >= 0.8
        record = forms_of(exported)["onnx-int8"]
        assert int8.ood is not None and int8.ood.threshold == pytest.approx(record["ood_threshold"])
        assert flags is not None and scores is not None and torch.equal(flags, scores > record["ood_threshold"])


# Any import of torch (or torchvision, Captum, Lightning) after this fails: what the slim predictor runs under (its
# test's process; the slim server's, as its PYTHONPATH's sitecustomize).
NO_TORCH = """
import sys

class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "captum", "lightning"):
            raise ImportError(f"the slim predictor imported {name}")

sys.meta_path.insert(0, NoTorch())
"""


# The slim image's Python, as its server's PYTHONPATH's sitecustomize: an import of a distribution that
# serve/requirements-slim.txt does not install (with all they require) fails, as it would in the image.
SLIM_ONLY = """
import sys, importlib.metadata as md

ALLOWED, DISTS = set(%r), md.packages_distributions()

class SlimOnly:
    def find_spec(self, name, path=None, target=None):
        dists = DISTS.get(name.split(".")[0], [])
        if dists and "visionapp" not in dists and not {d.lower().replace("_", "-") for d in dists} & ALLOWED:
            raise ImportError(f"the slim image does not install {dists[0]} (imported: {name})")

sys.meta_path.insert(0, SlimOnly())
"""


# The slim predictor's test, in a process of its own.
SLIM_SCRIPT = (
    NO_TORCH
    + """
import json

import numpy as np
from visionapp.decode import load_image
from visionapp.slim import load_slim

bundle, runtime, files = sys.argv[1], sys.argv[2], sys.argv[3:]
b = load_slim(bundle, runtime=runtime, threads=1)
x = np.stack([b.geometry(load_image(f, min_side=b.decode_side)) for f in files])
probs, scores, flags = b.answer(x)
print(json.dumps({"form": b.form, "note": b.form_note, "probs": probs.tolist(),
                  "scores": None if scores is None else scores.tolist(),
                  "flags": None if flags is None else flags.tolist()}))
"""
)


def test_the_slim_predictor_answers_as_the_torch_path_without_torch(exported: Path, tmp_path: Path) -> None:
    """`load_slim` (ONNX Runtime, Pillow, numpy) in a process that cannot import torch answers the run's whole test
    split as `load_bundle` does with the same form: the same top-1, probabilities within 1e-3, the same OOD flags;
    for the run's own OOD method and for knn (its .npy feature bank)."""
    files = (exported / TEST_FILES).read_text().split()
    knn = tmp_path / "knn"
    shutil.copytree(exported / "bundle", knn)
    meta = json.loads((knn / "model.json").read_text())
    meta["ood"] = {"method": "knn", "threshold": 0.6, "accept": 0.95, "k": 3, "features": "ood_features.npy"}
    (knn / "model.json").write_text(json.dumps(meta))
    bank = torch.nn.functional.normalize(torch.randn(200, 512, generator=torch.Generator().manual_seed(0)), dim=1)
    np.save(knn / "ood_features.npy", bank.half().numpy())
    for bundle, runtime in ((exported / "bundle", "auto"), (exported / "bundle", "onnx"), (knn, "onnx-int8")):
        r = subprocess.run([sys.executable, "-c", SLIM_SCRIPT, str(bundle), runtime, *files], capture_output=True,
                           text=True, timeout=300)  # fmt: skip
        assert r.returncode == 0, r.stderr
        slim = json.loads(r.stdout)
        assert runtime in ("auto", slim["form"]) and "without torch" in slim["note"]
        torch_path = load_bundle(bundle, runtime=slim["form"])
        with torch.inference_mode():
            probs, scores, flags = torch_path.answer(torch.stack([torch_path.transform.load(f) for f in files]))
        got = np.array(slim["probs"])
        assert (got.argmax(1) == probs.argmax(1).numpy()).all(), (runtime, bundle)
        assert np.abs(got - probs.numpy()).max() <= 1e-3
        if scores is None:
            assert slim["scores"] is None
        else:
            assert np.allclose(slim["scores"], scores.numpy(), atol=1e-4) and slim["flags"] == flags.tolist()
    assert torch_path.ood is not None and torch_path.ood.method == "knn"
    # staged for the slim image (make image-serve SERVER=kserve SLIM=1): the form the config's runtime picks, knn's
    # features, model.json and the card stay; the weights and the other forms go; it answers as before
    staged, config = tmp_path / "staged", tmp_path / "model-config.yaml"
    shutil.copytree(knn, staged)
    config.write_text((ROOT / "serve" / "model-config.yaml").read_text().replace("runtime: auto", "runtime: onnx-int8"))
    r = subprocess.run([sys.executable, "-m", "visionapp.slim", str(staged), "--model-config", str(config)],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0 and "model.pt" in r.stdout, r.stdout + r.stderr
    must = {"model.json", "model.int8.onnx", "ood_features.npy"}
    assert must <= {p.name for p in staged.iterdir()} <= must | {"MODEL_CARD.md"}
    answers = []
    for bundle in (knn, staged):
        slim = load_slim(bundle, "onnx-int8", threads=1)
        answers.append(slim.answer(np.stack([slim.geometry(load_image(f, min_side=slim.decode_side)) for f in files])))
    assert all(np.array_equal(a, b) for a, b in zip(*answers, strict=True))


def test_a_form_that_does_not_fit_falls_back_or_is_refused(exported: Path, tmp_path: Path) -> None:
    run = copy_run(exported, tmp_path / "run")
    meta_path = run / "bundle" / "model.json"
    meta = json.loads(meta_path.read_text())
    for field, value, reason in (("torch", "2.0.0", "compiled with torch 2.0.0"),
                                 ("cpu_isa", "neon", "compiled for neon instructions")):  # fmt: skip
        changed = json.loads(json.dumps(meta))
        changed["forms"]["cpu"]["aoti"][field] = value
        changed["forms"]["cpu"]["aoti"]["images_per_s"] = 1e9  # the fastest: auto tries it first
        meta_path.write_text(json.dumps(changed))
        b = load_bundle(run / "bundle", runtime="auto")
        assert b.form != "aoti" and reason in b.form_note
        with pytest.raises(ValueError, match=reason):
            load_bundle(run / "bundle", runtime="aoti")
    meta_path.write_text(json.dumps(meta))
    onnx = run / "bundle" / "model.onnx"
    onnx.write_bytes(onnx.read_bytes() + b"\0")  # changed since make export checked it
    with pytest.raises(ValueError, match="SHA-256 differs"):
        load_bundle(run / "bundle", runtime="onnx")
    unrecorded = json.loads(json.dumps(meta))
    del unrecorded["forms"]["cpu"]["onnx"]["sha256"]
    meta_path.write_text(json.dumps(unrecorded))
    with pytest.raises(ValueError, match="records no SHA-256"):
        load_bundle(run / "bundle", runtime="onnx")
    onnx.write_bytes(b"not a model")  # its hash is the recorded one, and it cannot be loaded
    for record in meta["forms"]["cpu"].values():
        record["passed"] = record.get("file") == "model.onnx"
    meta["forms"]["cpu"]["onnx"]["sha256"] = file_sha256(onnx)
    meta_path.write_text(json.dumps(meta))
    b = load_bundle(run / "bundle", runtime="auto")  # the only form that passed cannot load: eager, saying why
    assert b.form == "eager" and "loading model.onnx failed" in b.form_note
    with pytest.raises(ValueError, match="failed its check"):
        load_bundle(run / "bundle", runtime="aoti")
    onnx.unlink()
    assert "missing" in load_bundle(run / "bundle", runtime="auto").form_note


def test_an_export_that_differs_from_the_eager_model_is_left_out(
    exported: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check after compiling: the bundle's weights changed, while the "compiled" package is the one made from
    the old weights (compiling is replaced by copying it); the form is recorded as failed, naming the difference,
    and no package is left behind."""
    run = copy_run(exported, tmp_path / "run")
    (run / "bundle" / "model.cpu.pt2").unlink()
    meta_path = run / "bundle" / "model.json"
    meta_path.write_text(json.dumps({k: v for k, v in json.loads(meta_path.read_text()).items() if k != "forms"}))
    state = torch.load(run / "bundle" / "model.pt", weights_only=True)
    state["fc.bias"] += 1.0
    torch.save(state, run / "bundle" / "model.pt")
    old = exported / "bundle" / "model.cpu.pt2"
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package",
                        lambda program, package_path, **kw: shutil.copy2(old, package_path))  # fmt: skip
    records = export_bundle(run / "bundle", forms=("aoti",))
    assert not records["aoti"]["passed"] and "differ from the eager model's by 1" in records["aoti"]["reason"]
    assert not (run / "bundle" / "model.cpu.pt2").exists() and not forms_of(run)["aoti"]["passed"]
    assert not [f for f in (run / "bundle").iterdir() if ".tmp-" in f.name]  # no candidate left behind
    assert load_bundle(run / "bundle", runtime="auto").form == "eager"


def test_a_refused_re_export_keeps_the_form_and_record_that_were_there(
    exported: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Exporting again over a checked package: the new one cannot even load, the old package and its record in
    model.json stay as they were, so make archive still packs a consistent bundle."""
    run = copy_run(exported, tmp_path / "run")
    package = run / "bundle" / "model.cpu.pt2"
    before = package.read_bytes(), forms_of(run)["aoti"]["sha256"]

    def broken(program: object, package_path: str, **kw: object) -> None:
        Path(package_path).write_bytes(b"a broken package")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", broken)
    with pytest.raises(Exception):  # noqa: B017  # whatever loading a broken package raises
        export_bundle(run / "bundle", forms=("aoti",))
    assert (package.read_bytes(), forms_of(run)["aoti"]["sha256"]) == before
    assert not [f for f in (run / "bundle").iterdir() if ".tmp-" in f.name]
    build_archive(run / "bundle", name="classifier", out=tmp_path / "store", model_config=MODEL_CONFIG)


@pytest.fixture(scope="module", params=["torchserve", "kserve", "kserve-slim"])
def int8_server(
    request: pytest.FixtureRequest, exported: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalServer]:
    """The exported run served by each server with the int8 form pinned in the model config; kserve-slim: KServe's
    server with SLIM=1, in a process that can import only what the slim image installs (no torch)."""
    config = (ROOT / "serve" / "model-config.yaml").read_text().replace("runtime: auto", "runtime: onnx-int8")
    assert "runtime: onnx-int8" in config
    tmp = tmp_path_factory.mktemp(f"int8-{request.param}")
    server, slim = request.param.removesuffix("-slim"), request.param.endswith("-slim")
    with pytest.MonkeyPatch.context() as mp:
        if slim:
            (tmp / "guard").mkdir()
            allowed = closure([r.name for r in requirements(ROOT / "serve" / "requirements-slim.txt")])
            (tmp / "guard" / "sitecustomize.py").write_text(SLIM_ONLY % sorted(allowed))
            mp.setenv("PYTHONPATH", str(tmp / "guard"))
        with real_server(server, exported, tmp, model_config=config, extra_vars=("SLIM=1",) if slim else ()) as s:
            mp.delenv("PYTHONPATH", raising=False)  # the server has started: this process's children go unguarded
            yield s


def test_both_servers_answer_with_the_int8_form_as_in_process(int8_server: LocalServer, exported: Path) -> None:
    """The worker says it runs the int8 form; its answers equal the same form in process within 1e-4 (the OOD flag
    and score with them), for a batch past the exported batch range; explanations still come from eager, and the
    slim predictor (no torch) answers them 404, naming where they are served."""
    log = (int8_server.dir / ("torchserve.out" if int8_server.server == "torchserve" else "kserve.out")).read_text()
    assert "predictions: onnx-int8: model.int8.onnx" in log
    slim = "without torch" in log
    bundle = load_bundle(exported / "bundle", runtime="onnx-int8")
    files = (exported / TEST_FILES).read_text().split()[:12]
    with torch.no_grad():
        probs, scores, flags = bundle.answer(torch.stack([bundle.transform.load(f) for f in files]))
    assert scores is not None and flags is not None
    for f, p, score, flag in zip(files, probs, scores, flags, strict=True):
        status, headers, answer = post_with_headers(int8_server, Path(f).read_bytes())
        assert status == 200
        expected = dict(zip(bundle.class_names, p.tolist(), strict=True))
        for name, value in answer.items():  # type: ignore[union-attr]
            assert value == pytest.approx(expected[name], abs=1e-4)
        assert headers["x-ood"] == ("true" if flag else "false")
        assert float(headers["x-ood-score"]) == pytest.approx(float(score), abs=1e-4)
    status, answer = int8_server.post(Path(files[0]).read_bytes(), endpoint="explanations")
    if slim:
        assert status == 404 and "full image" in answer["message"], answer  # type: ignore[index]
    else:
        assert status == 200 and "heatmap_png_base64" in answer  # type: ignore[operator]  # the eager model explains
