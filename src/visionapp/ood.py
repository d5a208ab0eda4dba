"""Out-of-distribution scores: how far an image is from the training data, from the same forward pass that
predicts it.

A classifier answers every image with one of its classes; calibration makes its probabilities honest on its
classes' own images and says nothing about an image from elsewhere. A score per image, higher = further from the
training data, and a threshold fitted after `fit` on the validation split (like the temperature: at a target
acceptance of in-distribution images, 95% by default) give every answer a flag. The bundle's model.json holds the
method and the threshold (`ood`); a bundle without them (older runs) answers without a flag.

Scores (visionapp.train.ood measures them side by side on out-of-distribution sets and picks one):
  msp     minus the maximum softmax probability (Hendrycks & Gimpel 2017), at the calibration temperature
  energy  minus logsumexp of the logits (Liu et al. 2020): the free energy, not squashed by the softmax
  knn     the distance from the image's L2-normalised penultimate features to their k-th nearest neighbour among
          the training images' (Sun et al. 2022); the bundle stores those features (ood_features.pt, float16, at
          most MAX_BANK of them: 5 MB at resnet18's 512 dimensions)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

LOGIT_METHODS = ("msp", "energy")
METHODS = (*LOGIT_METHODS, "knn")
FEATURES_FILE = "ood_features.pt"  # in the bundle, for knn
MAX_BANK = 5000  # training features kept for knn (a seeded sample beyond that)


def scores(logits: torch.Tensor, method: str, temperature: float = 1.0) -> torch.Tensor:
    """One score per row of `logits` (N, C): higher = further from the training data."""
    logits = logits.float()
    if method == "msp":
        return -(logits / temperature).softmax(1).amax(1)
    if method == "energy":
        return -torch.logsumexp(logits, 1)
    raise ValueError(f"unknown logit score {method!r}; choose from {LOGIT_METHODS} (knn needs features)")


def head(model: nn.Module) -> nn.Linear:
    """The classifier's last Linear layer: its input is the penultimate feature vector."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no Linear layer to read penultimate features from")
    return linears[-1]


def logits_and_features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass: the logits and the penultimate features (the head's input)."""
    captured: list[torch.Tensor] = []
    hook = head(model).register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0]))
    try:
        logits = model(x)
    finally:
        hook.remove()
    return logits, captured[0].flatten(1)


def knn_scores(bank: torch.Tensor, features: torch.Tensor, k: int) -> torch.Tensor:
    """Distance to the k-th nearest of `bank` (normalised features), features normalised first."""
    features = F.normalize(features.float(), dim=1)
    bank = bank.to(features.device, torch.float32)
    # unit vectors: |a - b|^2 = 2 - 2 a.b, so the k-th nearest is the k-th most similar (a matmul; cdist is ~10x
    # slower for one image against thousands)
    similar = torch.cat(
        [(chunk @ bank.T).topk(min(k, len(bank)), dim=1).values[:, -1] for chunk in features.split(1024)]
    )
    return (2 - 2 * similar).clamp_min(0).sqrt()


def method_scores(
    method: str, logits: torch.Tensor, features: torch.Tensor, bank: torch.Tensor | None, k: int, temperature: float
) -> torch.Tensor:
    """Scores by method name from one pass's logits and features: knn against `bank`, else a logit score."""
    if method == "knn":
        if bank is None:
            raise ValueError("knn needs the training features it compares with")
        return knn_scores(bank, features, k)
    return scores(logits, method, temperature)


def auroc(in_scores: torch.Tensor, out_scores: torch.Tensor) -> float:
    """How often an out-of-distribution image scores above an in-distribution one, ties counted half (1.0: always,
    0.5: chance): the area under the ROC curve as the Mann-Whitney statistic, compared pair by pair in chunks."""
    inside, above = in_scores.double().flatten(), 0.0
    for chunk in out_scores.double().flatten().split(1024):
        pairs = chunk[:, None] - inside[None, :]
        above += float((pairs > 0).sum()) + 0.5 * float((pairs == 0).sum())
    return above / max(1, len(inside) * len(out_scores))


@dataclass(frozen=True)
class OODRecord:
    """What model.json stores: the method, its threshold, the acceptance on validation it was fitted for, and for
    knn its k and the features file."""

    method: str
    threshold: float
    accept: float  # the share of the validation split's images scored at or below the threshold
    k: int | None = None
    features: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if value is not None}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> OODRecord | None:
        if not d:
            return None
        return cls(method=str(d["method"]), threshold=float(d["threshold"]), accept=float(d["accept"]),
                   k=d.get("k"), features=d.get("features"))  # fmt: skip


def fit_threshold(val_scores: torch.Tensor, accept: float) -> float:
    """The score at or below which `accept` of the validation images fall (their `accept` quantile)."""
    if not 0 < accept < 1:
        raise ValueError(f"ood accept={accept} must be in (0, 1): the share of in-distribution images accepted")
    return float(torch.quantile(val_scores.double(), accept))
