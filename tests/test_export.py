"""The compiled model: make export's AOTInductor package, checked against the eager model, loaded in process
(`load_bundle(..., compiled=...)`) and served by TorchServe; the eager model wherever the package does not fit."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from helpers import EXPLAIN_CONFIG, MODEL_CONFIG, ROOT

from visionapp.bundle import TEST_FILES, file_sha256, load_bundle
from visionapp.deploy.archive import build_archive, build_archives
from visionapp.deploy.export import export_bundle
from visionapp.deploy.local import LocalServer
from visionapp.transforms import load_image

pytestmark = pytest.mark.slow


def copy_run(run: Path, to: Path) -> Path:
    """A run directory holding a copy of `run`'s bundle and its test split's file list."""
    to.mkdir(parents=True)
    shutil.copytree(run / "bundle", to / "bundle")
    shutil.copy2(run / TEST_FILES, to / TEST_FILES)
    return to


@pytest.fixture(scope="module")
def exported(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the trained run, exported by `make export` as a user runs it."""
    run = copy_run(trained_run, tmp_path_factory.mktemp("exported") / "run")
    r = subprocess.run(["make", "-s", "export", f"RUN={run}"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "checked on" in r.stdout
    return run


def test_export_records_a_package_equal_to_the_eager_model(exported: Path) -> None:
    meta = json.loads((exported / "bundle" / "model.json").read_text())
    record = meta["compiled"]["cpu"]
    assert (exported / "bundle" / record["file"]).is_file() and record["device"] == "cpu"
    assert record["torch"] == torch.__version__ and record["batch"] == [1, 8] and record["options"]["freezing"]
    assert record["channels_last"]  # NHWC inputs: converted by Bundle.forward
    assert record["max_abs_diff"] <= 1e-4 and record["checked_images"] == 8
    assert record["seconds"]["compile"] > 0 and record["cpu_isa"]
    assert record["sha256"] == file_sha256(exported / "bundle" / record["file"])

    eager, compiled = load_bundle(exported / "bundle"), load_bundle(exported / "bundle", compiled=True)
    assert compiled.compiled is not None and compiled.compiled_note.startswith("compiled")
    files = (exported / TEST_FILES).read_text().split()
    x = torch.stack([eager.transform(load_image(f)) for f in files[:20]])
    with torch.inference_mode():
        for n in (1, 3, 8, 20):  # 20: past the exported batch range, run in chunks of 8
            assert torch.allclose(compiled.probabilities(x[:n]), eager.probabilities(x[:n]), atol=1e-4)
            assert torch.allclose(compiled.forward(x[:n]), eager.model(x[:n]), atol=1e-4)


def test_a_package_that_does_not_fit_falls_back_to_eager_or_is_refused(exported: Path, tmp_path: Path) -> None:
    run = copy_run(exported, tmp_path / "run")
    meta_path = run / "bundle" / "model.json"
    meta = json.loads(meta_path.read_text())
    for field, value, reason in (("torch", "2.0.0", "compiled with torch 2.0.0"),
                                 ("cpu_isa", "neon", "compiled for neon instructions")):  # fmt: skip
        changed = json.loads(json.dumps(meta))
        changed["compiled"]["cpu"][field] = value
        meta_path.write_text(json.dumps(changed))
        b = load_bundle(run / "bundle", compiled="auto")
        assert b.compiled is None and reason in b.compiled_note
        with pytest.raises(ValueError, match=reason):
            load_bundle(run / "bundle", compiled=True)
    meta_path.write_text(json.dumps(meta))
    package = run / "bundle" / "model.cpu.pt2"
    package.write_bytes(package.read_bytes() + b"\0")  # native code changed since make export checked it
    for compiled in ("auto", True):  # refused before it is loaded: eager with the reason, or the reason raised
        with pytest.raises(ValueError, match="SHA-256 differs") if compiled is True else nullcontext():
            b = load_bundle(run / "bundle", compiled=compiled)
            assert b.compiled is None and "SHA-256 differs" in b.compiled_note
    unrecorded = json.loads(json.dumps(meta))
    del unrecorded["compiled"]["cpu"]["sha256"]
    meta_path.write_text(json.dumps(unrecorded))
    assert "records no SHA-256" in load_bundle(run / "bundle", compiled="auto").compiled_note
    package.write_bytes(b"not a package")  # fits on paper and its hash is the recorded one: cannot be loaded
    meta["compiled"]["cpu"]["sha256"] = file_sha256(package)
    meta_path.write_text(json.dumps(meta))
    assert "loading model.cpu.pt2 failed" in load_bundle(run / "bundle", compiled="auto").compiled_note
    (run / "bundle" / "model.cpu.pt2").unlink()
    assert "missing" in load_bundle(run / "bundle", compiled="auto").compiled_note


def test_an_export_that_differs_from_the_eager_model_is_refused(
    exported: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check after compiling: the bundle's weights changed, while the "compiled" package is the one made from
    the old weights (compiling is replaced by copying it); the export is refused, naming the difference, and
    leaves no package and no record behind."""
    run = copy_run(exported, tmp_path / "run")
    (run / "bundle" / "model.cpu.pt2").unlink()
    meta_path = run / "bundle" / "model.json"
    meta_path.write_text(json.dumps({k: v for k, v in json.loads(meta_path.read_text()).items() if k != "compiled"}))
    state = torch.load(run / "bundle" / "model.pt", weights_only=True)
    state["fc.bias"] += 1.0
    torch.save(state, run / "bundle" / "model.pt")
    old = exported / "bundle" / "model.cpu.pt2"
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package",
                        lambda program, package_path, **kw: shutil.copy2(old, package_path))  # fmt: skip
    with pytest.raises(ValueError, match=r"differ from the eager model's by 1"):
        export_bundle(run / "bundle")
    assert not (run / "bundle" / "model.cpu.pt2").exists() and "compiled" not in json.loads(meta_path.read_text())
    assert not [f for f in (run / "bundle").iterdir() if ".tmp-" in f.name]  # no candidate left behind


def test_a_refused_re_export_keeps_the_package_and_record_that_were_there(
    exported: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Exporting again over a checked package: the new one fails its check, the old package and its record in
    model.json stay as they were, so make archive still packs a consistent bundle."""
    run = copy_run(exported, tmp_path / "run")
    package, meta_path = run / "bundle" / "model.cpu.pt2", run / "bundle" / "model.json"
    before = package.read_bytes(), meta_path.read_text()

    def broken(program: object, package_path: str, **kw: object) -> None:
        Path(package_path).write_bytes(b"a broken package")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", broken)
    with pytest.raises(Exception):  # noqa: B017  # whatever loading a broken package raises
        export_bundle(run / "bundle")
    assert (package.read_bytes(), meta_path.read_text()) == before
    assert not [f for f in (run / "bundle").iterdir() if ".tmp-" in f.name]
    build_archive(run / "bundle", name="classifier", out=tmp_path / "store", model_config=MODEL_CONFIG)


@pytest.fixture(scope="module")
def compiled_server(exported: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    store = tmp_path_factory.mktemp("compiled_store")
    build_archives(exported / "bundle", name="classifier", out=store, model_config=MODEL_CONFIG,
                   explain_config=EXPLAIN_CONFIG)  # fmt: skip
    with LocalServer(store, tmp_path_factory.mktemp("serve"), checkout=ROOT) as server:
        yield server


def test_served_compiled_probabilities_equal_in_process(compiled_server: LocalServer, exported: Path) -> None:
    """The parity test on the compiled path: the worker says it runs the package; its answers equal the eager
    model in process within 1e-4, for one image and for a batch past the exported batch range."""
    assert "predictions: compiled: model.cpu.pt2" in (compiled_server.dir / "torchserve.out").read_text()
    bundle = load_bundle(exported / "bundle")
    files = (exported / TEST_FILES).read_text().split()[:12]
    status, answers = compiled_server.post(
        json.dumps({"images": [base64.b64encode(Path(f).read_bytes()).decode() for f in files], "topk": "5"}).encode(),
        content_type="application/json",
    )
    assert status == 200 and len(answers) == len(files)  # type: ignore[arg-type]
    with torch.no_grad():
        probs = bundle.probabilities(torch.stack([bundle.transform(load_image(f)) for f in files]))
    for answer, p in zip(answers, probs, strict=True):  # type: ignore[call-overload]
        expected = dict(zip(bundle.class_names, p.tolist(), strict=True))
        for name, value in answer.items():
            assert value == pytest.approx(expected[name], abs=1e-4)
    status, answer = compiled_server.post(Path(files[0]).read_bytes(), endpoint="explanations")
    assert status == 200 and "heatmap_png_base64" in answer  # type: ignore[operator]  # the eager model explains
