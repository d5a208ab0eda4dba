"""The bundle: the contract every stage after training reads (see DESIGN.md).

    bundle/model.pt    the plain nn.Module's state_dict (torch.load(..., weights_only=True))
    bundle/model.json  arch, class names, input size, mean/std, pretrained origin, metrics, versions

From these two files alone, with torch and torchvision, `load_bundle` rebuilds the model and its exact
eval preprocessing. explain/ and serve/ use nothing else from training.
"""

from __future__ import annotations

import json
import platform
from contextlib import suppress
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.models import get_model

from visionapp.transforms import EvalPreset

WEIGHTS_FILE, META_FILE = "model.pt", "model.json"
# Beside the bundle in a run directory: the test split's image files, one per line (what explain/ measures on).
TEST_FILES = "test_files.txt"


@dataclass
class Bundle:
    model: nn.Module  # in eval mode
    transform: EvalPreset
    meta: dict[str, Any]

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    @property
    def temperature(self) -> float:
        """Divides the logits before the softmax: fitted on the validation split after training (1.0: none)."""
        return float(self.meta.get("temperature", 1.0))

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """Calibrated class probabilities (N, classes) of a normalised batch; `model(x)` stays the raw logits."""
        return (self.model(x) / self.temperature).softmax(dim=1)


def versions() -> dict[str, str]:
    """The library versions a bundle was made with (read from the installed metadata: no training import)."""
    out = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__}
    with suppress(PackageNotFoundError):
        out["lightning"] = version("lightning")
    return out


def save_bundle(
    directory: str | Path,
    model: nn.Module,
    *,
    arch: str,
    class_names: list[str],
    image_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    pretrained: dict[str, Any],
    metrics: dict[str, Any],
    temperature: float = 1.0,
) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # Contiguous NCHW copies: loadable anywhere, whatever memory format training used.
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    torch.save(state, directory / WEIGHTS_FILE)
    meta = {
        "arch": arch,
        "num_classes": len(class_names),
        "class_names": list(class_names),
        "image_size": image_size,
        "mean": list(mean),
        "std": list(std),
        "pretrained": pretrained,
        "metrics": metrics,
        "temperature": temperature,
        "versions": versions(),
    }
    if arch.startswith("vit_"):
        meta["model_kwargs"] = {"image_size": image_size}
    (directory / META_FILE).write_text(json.dumps(meta, indent=2))
    return directory


def load_bundle(directory: str | Path, map_location: str | torch.device = "cpu") -> Bundle:
    directory = Path(directory)
    if not (directory / META_FILE).is_file():
        raise FileNotFoundError(
            f"{directory} is not a bundle (no {META_FILE}); train first (make train) "
            "or pass a run's bundle/ folder, e.g. runs/latest/bundle"
        )
    meta = json.loads((directory / META_FILE).read_text())
    model = get_model(meta["arch"], weights=None, num_classes=meta["num_classes"], **meta.get("model_kwargs", {}))
    model.load_state_dict(torch.load(directory / WEIGHTS_FILE, map_location=map_location, weights_only=True))
    transform = EvalPreset(image_size=meta["image_size"], mean=meta["mean"], std=meta["std"])
    return Bundle(model.eval(), transform, meta)
