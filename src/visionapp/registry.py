"""A run's bundle as an MLflow model: logged and registered after fit (configs/mlflow.yaml), fetched back to be
archived and served (`make archive MODEL_URI=models:/classifier/3`).

    python -m visionapp.registry models:/classifier/3 [--out runs/registry]    prints the fetched run folder

The model is a `pyfunc` (`BundleModel`): it loads the bundle with `load_bundle` (the fastest form that passed its
checks) and answers a list of image files' bytes, or a DataFrame with an `image` column of them, with
`Bundle.answer`: one row per image with the top class, every class's calibrated probability, the OOD score and flag.
The package's own code travels with the model (code_paths), so loading it needs the listed requirements only.
This module imports mlflow (the `track` extra): training imports it only when a run has an MLflow logger.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.types import ColSpec, Schema

from visionapp.bundle import load_bundle, versions
from visionapp.errors import UserError, run_main
from visionapp.manifest import CARD_FILE, META_FILE

# What loading the model needs besides the package's own code, torch and torchvision (`versions` adds those)
REQUIREMENTS = ("numpy", "pillow", "pyyaml", "threadpoolctl", "onnxruntime", "pandas", "mlflow")
MODEL_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:/(?P<version>\d+|latest)|@(?P<alias>[\w-]+))/?")


class BundleModel(PythonModel):  # type: ignore[misc]
    """The bundle answering as the servers do: the top class, probabilities, OOD score and flag per image."""

    def load_context(self, context: Any) -> None:
        self.bundle = load_bundle(context.artifacts["bundle"], runtime="auto")

    # no type hints: MLflow would take them for the input's schema (the signature logged with the model is it)
    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        images = list(model_input["image"]) if isinstance(model_input, pd.DataFrame) else list(model_input)
        x = torch.stack([self.bundle.transform.load(bytes(image)) for image in images])
        probabilities, scores, flags = self.bundle.answer(x)
        names = self.bundle.class_names
        return pd.DataFrame({
            "label": [names[i] for i in probabilities.argmax(1).tolist()],
            "probabilities": probabilities.tolist(),
            "ood_score": [None] * len(images) if scores is None else scores.tolist(),
            "ood": [None] * len(images) if flags is None else flags.tolist(),
        })  # fmt: skip


def requirements() -> list[str]:
    """The packages loading the model needs (besides its own code), pinned to the versions that logged it."""
    return [f"{package}=={v}" for package, v in versions(REQUIREMENTS).items() if package != "python"]


def register(client: MlflowClient, run_id: str, bundle: Path, name: str, tags: dict[str, str]) -> str:
    """Log `bundle` as run_id's pyfunc model and register it under `name`, the run's figures as the version's
    tags and its model card as the version's description; the version registered."""
    mlflow.set_tracking_uri(client.tracking_uri)
    signature = ModelSignature(inputs=Schema([ColSpec("binary", "image")]))
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model", python_model=BundleModel(), artifacts={"bundle": str(bundle)},
            code_paths=[str(Path(__file__).parent)], pip_requirements=requirements(), signature=signature,
            registered_model_name=name, await_registration_for=60,
        )  # fmt: skip
    model_version = str(info.registered_model_version)
    for key, value in tags.items():
        client.set_model_version_tag(name, model_version, key, value)
    card = bundle / CARD_FILE
    if card.is_file():
        client.update_model_version(name, model_version, description=card.read_text())
    return model_version


def resolve(client: MlflowClient, uri: str) -> tuple[str, str]:
    """models:/<name>/<version>, models:/<name>/latest or models:/<name>@<alias> -> (name, version)."""
    match = MODEL_URI.fullmatch(uri)
    if match is None:
        raise UserError(f"MODEL_URI={uri!r}: expected models:/<name>/<version>, models:/<name>/latest or "
                        "models:/<name>@<alias>")  # fmt: skip
    name = match["name"]
    if match["alias"]:
        return name, str(client.get_model_version_by_alias(name, match["alias"]).version)
    if match["version"] != "latest":
        return name, match["version"]
    versions = client.search_model_versions(f"name = '{name}'")
    if not versions:
        raise UserError(f"{uri}: no version of {name!r} in the registry at {client.tracking_uri}")
    return name, str(max(int(v.version) for v in versions))


def fetch(uri: str, out: Path) -> Path:
    """The registered model's bundle as a run folder, out/<name>-v<version>/bundle (a registry version never
    changes: fetched once). Archives and servers take it as they take runs/<run>: its name is the version's."""
    client = MlflowClient()
    try:
        name, model_version = resolve(client, uri)
        run_dir = out / f"{name}-v{model_version}"
        if (run_dir / "bundle" / META_FILE).is_file():
            return run_dir
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out) as tmp:  # on the same file system: the bundle is moved
            local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{model_version}", dst_path=tmp))
            bundle = local / "artifacts" / "bundle"
            if not (bundle / META_FILE).is_file():
                raise UserError(f"{uri}: not a visionapp bundle model (no artifacts/bundle/{META_FILE})")
            run_dir.mkdir(parents=True, exist_ok=True)
            shutil.move(str(bundle), run_dir / "bundle")
    except MlflowException as e:
        raise UserError(f"{uri}: {e.message} (the registry is MLFLOW_TRACKING_URI's: {client.tracking_uri})") from None
    (run_dir / "registry.json").write_text(json.dumps({"model_uri": uri, "name": name, "version": model_version}))
    return run_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_uri", help="models:/<name>/<version> (or /latest, or @<alias>) in MLFLOW_TRACKING_URI")
    ap.add_argument("--out", type=Path, default=Path("runs/registry"), help="where fetched versions are kept")
    args = ap.parse_args(argv)
    print(fetch(args.model_uri, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
