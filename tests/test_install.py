"""Installs that reproduce: the tested versions (constraints.txt) are what this environment holds, each stage
installs alone from its extra, and every image runs as a user with those versions."""

from __future__ import annotations

import difflib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, TRACK_OPTIONAL, closure, loaded_by_each

# Each extra, and the modules its stage runs (what `pip install visionapp[extra]` must be enough for).
STAGES = {
    "serve": ["visionapp.serve.torch_engine", "visionapp.serve.handler"],  # the core's engine on torch
    "kserve": ["visionapp.serve.kserve_server"],
    "train": ["visionapp.train.cli"],
    "explain": ["visionapp.explain.__main__"],
    "predict": ["visionapp.predict.__main__"],
    "deploy": ["visionapp.deploy.export", "visionapp.deploy.archive", "visionapp.deploy.manifests"],
    "launch": ["visionapp.launch", "visionapp.train.cli"],
    "demo": ["visionapp.client.demo"],
}
# Imported only because this environment has them: each importer tries them and goes on without (kubernetes'
# dynamic client tries kubernetes-validate and its jsonschema, uvicorn watchfiles, httpx brotli, numpy.f2py
# charset-normalizer).
OPTIONAL = {"kubernetes-validate", "jsonschema", "jsonschema-specifications", "referencing", "rpds-py",
            "importlib-resources", "watchfiles", "brotli", "charset-normalizer", *TRACK_OPTIONAL}  # fmt: skip
# pyproject's dependencies, which every extra installs: imported once before the stages' modules (not counted)
BASE = ("torch", "torchvision", "numpy", "PIL.Image", "matplotlib.pyplot", "captum.attr", "onnxruntime")
TRAINING_STACK = {"lightning", "pytorch-lightning", "lightning-fabric", "torchx", "kubernetes", "jsonargparse"}


def _freeze() -> list[str]:
    out = subprocess.run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"], capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    return sorted(ln for ln in out.splitlines() if ln and not ln.lower().startswith("visionapp"))


def test_this_environment_holds_the_tested_versions() -> None:
    """make venv installs with constraints.txt: what it holds is the file, line for line (a package the file lacks
    or a version it does not name fails here with the diff; make constraints rewrites the file)."""
    stamp = ROOT / ".venv" / ".installed-stamp"
    if Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():
        pytest.skip("not the project's .venv")
    if stamp.is_file() and stamp.read_text().strip() == "":
        pytest.skip("installed with CONSTRAINTS= (the newest versions pyproject.toml allows), as asked")
    pinned = sorted(ln for ln in (ROOT / "constraints.txt").read_text().splitlines() if ln and not ln.startswith("#"))
    installed = _freeze()
    diff = "\n".join(difflib.unified_diff(pinned, installed, "constraints.txt", "installed", lineterm=""))
    assert installed == pinned, f"make constraints (then make venv) to record what is installed:\n{diff}"


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[str]]:
    modules = sorted({m for ms in STAGES.values() for m in ms})
    found = loaded_by_each(modules, tmp_path_factory.mktemp("probe"), preload=BASE)
    return {m: {d.lower().replace("_", "-") for d in ds} - {"visionapp"} for m, ds in found.items()}


@pytest.mark.slow  # one interpreter importing every stage: ~15 s
@pytest.mark.parametrize("extra", sorted(STAGES))
def test_each_stage_installs_alone_from_its_extra(extra: str, loaded: dict[str, set[str]]) -> None:
    """What `pip install visionapp[extra]` installs (pyproject's dependencies and the extra, with all they require,
    from the installed metadata) holds every distribution the stage's modules load."""
    installs = closure([f"visionapp[{extra}]"]) | OPTIONAL
    for module in STAGES[extra]:
        assert loaded[module], module  # the probe saw it import something
        missing = loaded[module] - installs
        assert not missing, f"{module} loads {sorted(missing)}: add them to the {extra} extra"


def test_a_serving_install_has_no_training_stack() -> None:
    assert not closure(["visionapp[serve]"]) & TRAINING_STACK
    # KServe's SDK requires the kubernetes client itself; nothing of training comes with it
    assert not closure(["visionapp[kserve]"]) & (TRAINING_STACK - {"kubernetes"})


@pytest.mark.slow  # pip resolves the whole set from the package index: ~20 s
def test_pip_resolves_a_serving_install_into_an_empty_environment_as_the_closure_says(tmp_path: Path) -> None:
    """What pip itself would install into an empty environment for `visionapp[serve]` with constraints.txt
    (--ignore-installed --dry-run: its resolver and the index's metadata, nothing installed) is the closure the
    per-stage test above checks the imports against: no training stack, the tested versions."""
    report = tmp_path / "report.json"
    subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                    "--report", str(report), "-c", str(ROOT / "constraints.txt"), f"{ROOT}[serve]"],
                   capture_output=True, text=True, check=True, timeout=600)  # fmt: skip
    resolved = {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"]
                for i in json.loads(report.read_text())["install"]}  # fmt: skip
    assert not set(resolved) & TRAINING_STACK
    assert set(resolved) - {"visionapp"} == closure(["visionapp[serve]"]) - {"visionapp"}
    pinned = dict(ln.split("==") for ln in (ROOT / "constraints.txt").read_text().splitlines() if "==" in ln)
    pinned = {k.lower().replace("_", "-"): v for k, v in pinned.items()}
    # every package at its tested version (pip freeze, which wrote the file, leaves out pip's own tools)
    assert not set(resolved) - set(pinned) - {"visionapp", "setuptools", "wheel", "pip"}
    assert {k: v for k, v in resolved.items() if k in pinned} == {k: pinned[k] for k in resolved if k in pinned}


DOCKERFILES = sorted([ROOT / "Dockerfile", *(ROOT / "serve").glob("Dockerfile*")])


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_image_runs_as_a_user_with_the_tested_versions(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0"), f"{dockerfile.name}: the last USER must not be root"
    assert "COPY " in text and "constraints.txt" in text and "-c constraints.txt" in text.replace("/tmp/", "")


def test_a_locally_built_base_is_used_by_its_digest(tmp_path: Path) -> None:
    """make base-image records the digest of the base it built (BASE_LOCK); the serving images then build FROM it
    by digest, and a base given by tag is named as such."""
    lock = tmp_path / "base.mk"
    lock.write_text("BASE_IMAGE ?= localhost/visionapp-base@sha256:" + "a" * 64 + "\n")
    make = ["make", "-n", "image-serve", "IMAGE=x", "ENGINE=docker", "SERVER=kserve", f"RUN={tmp_path}"]
    pinned = subprocess.run([*make, f"BASE_LOCK={lock}"], cwd=ROOT, capture_output=True, text=True).stdout
    assert f"--build-arg BASE_IMAGE=localhost/visionapp-base@sha256:{'a' * 64}" in pinned
    tagged = subprocess.run([*make, f"BASE_LOCK={tmp_path / 'none.mk'}"], cwd=ROOT, capture_output=True, text=True)
    assert "--build-arg BASE_IMAGE=docker.io/library/debian:bookworm-slim" in tagged.stdout
    for base_lock, said in ((lock, ""), (tmp_path / "none.mk", "is a tag, not a digest")):
        check = subprocess.run(["make", "-s", "base-check", f"BASE_LOCK={base_lock}"], cwd=ROOT, capture_output=True,
                               text=True, check=True)  # fmt: skip
        assert said in check.stdout and (said or check.stdout == "")
