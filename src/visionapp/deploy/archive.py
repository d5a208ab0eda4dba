"""Pack a bundle into a self-contained TorchServe archive with torch-model-archiver.

    python -m visionapp.deploy.archive --bundle runs/latest/bundle --name classifier --out model_store \
        --model-config serve/model-config.yaml --explain-config serve/explain-config.yaml

writes classifier.mar (predictions) and classifier-explain.mar (explanations, their own workers and queue).

The .mar holds the bundle (model.pt, model.json, and the model's forms that passed make export's checks:
model.<device>.pt2, model.onnx, model.int8.onnx), the handler (visionapp/serve/handler.py, as the archive's
handler.py), the model config (batching, workers, timeouts) and the package code serving imports: the shared
layer it needs (bundle, transforms, imagefiles, errors, attribution) and the serving runtime, visionapp/serve/
(nothing of the tooling in visionapp/deploy/ or visionapp/client/, nor the training stack).
So TorchServe needs torch, torchvision, Pillow, captum and onnxruntime but not visionapp installed. Everything is
found from the installed package (editable or not) and the paths given; nothing is read from a checkout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from visionapp.errors import run_main
from visionapp.manifest import CARD_FILE, META_FILE, bundle_file, check_complete
from visionapp.serve.inputs import explain_name

PACKAGE = Path(__file__).parents[1]  # the installed visionapp package
HANDLER = PACKAGE / "serve" / "handler.py"
# What the handler imports, copied into the archive: the base modules and the two stages serving uses.
SERVING_CODE = (
    "__init__.py",
    "bundle.py",
    "decode.py",
    "errors.py",
    "imagefiles.py",
    "forms.py",
    "manifest.py",
    "ood.py",
    "slim.py",
    "transforms.py",
    "attribution",
    "serve",
)


def run_archiver(cmd: list[str]) -> None:
    """Run torch-model-archiver with a TMPDIR of its own: it stages every archive in <TMPDIR>/<model name>, so two
    archives of one name built at once (two make archive, parallel tests) would otherwise meet there and fail."""
    with tempfile.TemporaryDirectory() as tmpdir:
        subprocess.run(cmd, check=True, env={**os.environ, "TMPDIR": tmpdir})


def build_archive(
    bundle: str | Path,
    *,
    model_config: str | Path,
    name: str = "classifier",
    out: str | Path = "model_store",
    version: str | None = None,
) -> Path:
    """The .mar of `bundle` in `out`; its version (shown by the management API's /models/<name>) is the run's
    name unless given, so a running server tells which run it serves."""
    bundle, out = Path(bundle), Path(out)
    version = version or bundle.resolve().parent.name
    check_complete(bundle)
    for f in (bundle / "model.pt", bundle / "model.json"):
        if not f.is_file():
            raise FileNotFoundError(f"{f} is missing; train first (make train) or pass a run's bundle/ folder")
    model_config = check_model_config(Path(model_config))
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        # extra-files copies a folder's *contents* into the archive root: stage the package under it.
        staged = Path(tmp) / "visionapp"
        staged.mkdir()
        for item in SERVING_CODE:
            src = PACKAGE / item
            if src.is_dir():
                shutil.copytree(src, staged / item, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(src, staged / item)
        cmd = [
            str(Path(sys.executable).parent / "torch-model-archiver"),
            "--model-name", name,
            "--version", version,
            "--serialized-file", str(bundle / "model.pt"),
            "--handler", str(HANDLER),
            "--extra-files", ",".join([str(bundle / "model.json"), *map(str, form_files(bundle)),
                                       *map(str, ood_files(bundle)), *map(str, bundle.glob(CARD_FILE)), tmp]),
            "--config-file", str(model_config),
            "--export-path", str(out),
            "--force",
        ]  # fmt: skip
        run_archiver(cmd)
    return out / f"{name}.mar"


def build_archives(
    bundle: str | Path, *, model_config: str | Path, explain_config: str | Path, name: str = "classifier",
    out: str | Path = "model_store",
) -> tuple[Path, Path]:  # fmt: skip
    """`<name>.mar` for predictions and `<name>-explain.mar` for explanations: the same bundle and code, each with
    its own model config (workers, batching, queue, timeout), registered side by side so that explanations have
    workers and a queue of their own (make serve)."""
    mar = build_archive(bundle, model_config=model_config, name=name, out=out)
    return mar, build_archive(bundle, model_config=explain_config, name=explain_name(name), out=out)


def ood_files(bundle: Path) -> list[Path]:
    """The out-of-distribution score's file model.json records (knn's training features): packed too."""
    record = json.loads((bundle / META_FILE).read_text()).get("ood") or {}
    files = [bundle_file(bundle, record["features"])] if record.get("features") else []
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f} is recorded in {bundle / META_FILE} but missing; train again")
    return files


def form_files(bundle: Path) -> list[Path]:
    """The model's exported forms that passed their checks (make export; model.json's `forms`): packed too, the
    server runs the fastest that loads where it runs."""
    meta = json.loads((bundle / META_FILE).read_text())
    records = [r for per_device in meta.get("forms", {}).values() for r in per_device.values()
               if r.get("passed") and "file" in r]  # fmt: skip
    packages = [bundle_file(bundle, record["file"]) for record in records]
    for p in packages:
        if not p.is_file():
            raise FileNotFoundError(f"{p} is recorded in {bundle / 'model.json'} but missing; make export again")
    return packages


def check_model_config(path: Path) -> Path:
    """TorchServe reads the model config only when it loads the .mar; say what is wrong with it here instead."""
    if not path.is_file():
        raise FileNotFoundError(f"model config {path} is missing; start from serve/model-config.yaml")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"model config {path} is not valid YAML: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"model config {path} must be a YAML mapping (batchSize: 8, ...), as serve/model-config.yaml")
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default="runs/latest/bundle")
    ap.add_argument("--name", default="classifier")
    ap.add_argument("--out", default="model_store")
    ap.add_argument("--model-config", default="serve/model-config.yaml", help="TorchServe model config (YAML)")
    ap.add_argument("--explain-config", default="serve/explain-config.yaml", help="the explanations' model config")
    args = ap.parse_args()
    try:
        mars = build_archives(args.bundle, name=args.name, out=args.out, model_config=args.model_config,
                              explain_config=args.explain_config)  # fmt: skip
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(str(e)) from None
    for mar in mars:
        print(f"{mar} ({mar.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
