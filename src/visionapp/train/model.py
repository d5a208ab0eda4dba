"""The plain nn.Module: any torchvision classifier by name, with a head for our classes.

Pretrained ImageNet weights come through torchvision's weights API (downloaded once into
$TORCH_HOME/hub/checkpoints). Offline with nothing cached, the model starts from random weights with a
WARNING that names the file to put in the cache, unless `require_pretrained` makes that an error.
"""

from __future__ import annotations

import logging
import os
import pickle
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.error import URLError

import torch
import torchvision
from torch import nn
from torchvision.models import get_model, get_model_weights, list_models

log = logging.getLogger(__name__)


@dataclass
class PretrainedInfo:
    """What the model started from; recorded in metrics.json and the bundle."""

    pretrained: bool
    weights: str | None  # e.g. "ResNet18_Weights.IMAGENET1K_V1" or a file path
    reason: str | None = None  # why not pretrained, when it is not

    def to_dict(self) -> dict:
        return asdict(self)


def classification_archs() -> list[str]:
    return list_models(module=torchvision.models)


def build_model(
    arch: str,
    num_classes: int,
    *,
    weights: str | None = "DEFAULT",
    weights_file: str | None = None,
    require_pretrained: bool = False,
    image_size: int | None = None,
) -> tuple[nn.Module, PretrainedInfo]:
    """Build `arch` with a fresh `num_classes` head and load pretrained weights for everything else.

    weights: a torchvision weights name for `arch` ("DEFAULT", "IMAGENET1K_V1", ...) or None for random init.
    weights_file: a local state_dict file (e.g. the .pth torchvision would download); wins over `weights`.
    """
    if arch not in classification_archs():
        valid = ", ".join(classification_archs())
        raise ValueError(f"unknown architecture {arch!r}; choose one of torchvision's classifiers: {valid}")
    kwargs = {"image_size": image_size} if arch.startswith("vit_") and image_size else {}
    # Building with num_classes gives the family's own head at the right size; pretrained tensors of another
    # shape (the 1000-class head) are then skipped when loading, whatever the head is called in that family.
    model = get_model(arch, weights=None, num_classes=num_classes, **kwargs)

    state, info = _pretrained_state(arch, weights, weights_file)
    if state is None:
        if require_pretrained:
            raise RuntimeError(f"pretrained weights required (require_pretrained=true) but not loaded: {info.reason}")
        if weights is not None or weights_file is not None:
            log.warning("%s; training %s from random initialisation", info.reason, arch)
        return model, info

    own = model.state_dict()
    if arch.startswith("vit_") and "encoder.pos_embedding" in state:
        from torchvision.models.vision_transformer import interpolate_embeddings

        state = interpolate_embeddings(model.image_size, model.patch_size, state)
    compatible = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(set(own) - set(compatible))
    model.load_state_dict(compatible, strict=False)
    log.info("loaded %s; newly initialised: %s", info.weights, ", ".join(skipped) or "nothing")
    return model, info


def _pretrained_state(
    arch: str, weights: str | None, weights_file: str | None
) -> tuple[dict[str, torch.Tensor] | None, PretrainedInfo]:
    if weights_file is not None:
        path = Path(weights_file)
        if not path.is_file():
            raise FileNotFoundError(f"weights_file {path} does not exist; give the path of a state_dict .pth file")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        return state, PretrainedInfo(True, str(path))
    if weights is None:
        return None, PretrainedInfo(False, None, "weights=null: random initialisation was asked for")
    try:
        enum = get_model_weights(arch)[weights]
    except KeyError:
        valid = ["DEFAULT", *get_model_weights(arch).__members__]
        raise ValueError(f"unknown weights {weights!r} for {arch}; choose from {valid} or null") from None
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(enum.url)
    try:
        # weights_only: a file found in the hub cache is data, never code (torch.hub's default unpickles anything)
        state = enum.get_state_dict(progress=True, check_hash=True, weights_only=True)
    except (URLError, OSError, RuntimeError, pickle.UnpicklingError) as e:  # offline, proxy, partial, not weights
        reason = (
            f"could not load pretrained {enum} ({type(e).__name__}: {e}); to use them offline, "
            f"put {enum.url} at {cached}"
        )
        return None, PretrainedInfo(False, None, reason)
    return state, PretrainedInfo(True, str(enum))


def classifier_head(model: nn.Module) -> nn.Module:
    """The last layer that produces the class logits (resnet `fc`, vit `heads.head`, ...)."""
    return [m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)][-1]


def backbone_modules(model: nn.Module) -> nn.ModuleList:
    """Top-level children that do not contain the classifier head: what BackboneFinetuning freezes."""
    head = classifier_head(model)
    return nn.ModuleList(c for c in model.children() if not any(m is head for m in c.modules()))
