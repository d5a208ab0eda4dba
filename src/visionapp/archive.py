"""Pack a bundle into a self-contained TorchServe archive with torch-model-archiver.

    python -m visionapp.archive --bundle runs/latest/bundle --name classifier --out model_store

The .mar holds the bundle (model.pt, model.json), serve/handler.py, serve/model-config.yaml and a copy of
this package, so TorchServe needs torch, torchvision, Pillow and captum but not visionapp installed.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PACKAGE = Path(__file__).parent
SERVE = PACKAGE.parents[1] / "serve"  # the repository's serve/ folder (handler, configs)


def build_archive(
    bundle: str | Path,
    *,
    name: str = "classifier",
    out: str | Path = "model_store",
    version: str = "1.0",
    serve_dir: str | Path = SERVE,
) -> Path:
    bundle, out, serve_dir = Path(bundle), Path(out), Path(serve_dir)
    for f in (bundle / "model.pt", bundle / "model.json"):
        if not f.is_file():
            raise FileNotFoundError(f"{f} is missing; train first (make train) or pass a run's bundle/ folder")
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
            "--config-file", str(serve_dir / "model-config.yaml"),
            "--export-path", str(out),
            "--force",
        ]  # fmt: skip
        subprocess.run(cmd, check=True)
    return out / f"{name}.mar"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default="runs/latest/bundle")
    ap.add_argument("--name", default="classifier")
    ap.add_argument("--out", default="model_store")
    args = ap.parse_args()
    try:
        mar = build_archive(args.bundle, name=args.name, out=args.out)
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None
    print(f"{mar} ({mar.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
