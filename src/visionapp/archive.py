"""Pack a bundle into a self-contained TorchServe archive with torch-model-archiver.

    python -m visionapp.archive --bundle runs/latest/bundle --name classifier --out model_store \
        [--model-config serve/model-config.yaml]

The .mar holds the bundle (model.pt, model.json), serve/handler.py, the model config (batching, workers,
timeouts; serve/model-config.yaml unless --model-config names another) and a copy of this package, so
TorchServe needs torch, torchvision, Pillow and captum but not visionapp installed.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

PACKAGE = Path(__file__).parent
SERVE = PACKAGE.parents[1] / "serve"  # the repository's serve/ folder (handler, configs)


def build_archive(
    bundle: str | Path,
    *,
    name: str = "classifier",
    out: str | Path = "model_store",
    version: str = "1.0",
    serve_dir: str | Path = SERVE,
    model_config: str | Path | None = None,
) -> Path:
    bundle, out, serve_dir = Path(bundle), Path(out), Path(serve_dir)
    for f in (bundle / "model.pt", bundle / "model.json"):
        if not f.is_file():
            raise FileNotFoundError(f"{f} is missing; train first (make train) or pass a run's bundle/ folder")
    model_config = check_model_config(Path(model_config) if model_config else serve_dir / "model-config.yaml")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        # extra-files copies a folder's *contents* into the archive root: stage the package under it.
        shutil.copytree(PACKAGE, Path(tmp) / "visionapp", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        cmd = [
            str(Path(sys.executable).parent / "torch-model-archiver"),
            "--model-name", name,
            "--version", version,
            "--serialized-file", str(bundle / "model.pt"),
            "--handler", str(serve_dir / "handler.py"),
            "--extra-files", f"{bundle / 'model.json'},{tmp}",
            "--config-file", str(model_config),
            "--export-path", str(out),
            "--force",
        ]  # fmt: skip
        subprocess.run(cmd, check=True)
    return out / f"{name}.mar"


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default="runs/latest/bundle")
    ap.add_argument("--name", default="classifier")
    ap.add_argument("--out", default="model_store")
    ap.add_argument("--model-config", default=None, help="TorchServe model config (default serve/model-config.yaml)")
    args = ap.parse_args()
    try:
        mar = build_archive(args.bundle, name=args.name, out=args.out, model_config=args.model_config)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(str(e)) from None
    print(f"{mar} ({mar.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
