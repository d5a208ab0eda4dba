"""Out-of-distribution scores: how far an image is from the training data, from the same forward pass that predicts
it. numpy only: the slim predictor scores without torch.

A classifier answers every image with one of its classes; calibration makes its probabilities honest on its
classes' own images and says nothing about an image from elsewhere. A score per image, higher = further from the
training data, and a threshold fitted after `fit` on the validation split (like the temperature: at a target
acceptance of in-distribution images, 95% by default) give every answer a flag. The bundle's model.json holds the
method and the threshold (`ood`); a bundle without them (older runs) answers without a flag.

Scores (visionapp.train.ood measures them side by side on out-of-distribution sets and picks one):
  msp     minus the maximum softmax probability (Hendrycks & Gimpel 2017), at the calibration temperature
  energy  minus logsumexp of the logits (Liu et al. 2020): the free energy, not squashed by the softmax
  knn     the distance from the image's L2-normalised penultimate features to their k-th nearest neighbour among
          the training images' (Sun et al. 2022); the bundle stores those features (ood_features.npy, float16, at
          most MAX_BANK of them: 5 MB at resnet18's 512 dimensions)
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
from threadpoolctl import ThreadpoolController

LOGIT_METHODS = ("msp", "energy")
METHODS = (*LOGIT_METHODS, "knn")
FEATURES_FILE = "ood_features.npy"  # in the bundle, for knn (runs from before it: ood_features.pt, read by torch)
MAX_BANK = 5000  # training features kept for knn (a seeded sample beyond that)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of logits (N, C) / temperature, in float32 (the calibrated probabilities)."""
    z = logits.astype(np.float32) / np.float32(temperature)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def scores(logits: np.ndarray, method: str, temperature: float = 1.0) -> np.ndarray:
    """One score per row of `logits` (N, C): higher = further from the training data."""
    if method == "msp":
        return -softmax(logits, temperature).max(axis=1)
    if method == "energy":
        z = logits.astype(np.float32)
        top = z.max(axis=1)
        return -(top + np.log(np.exp(z - top[:, None]).sum(axis=1)))
    raise ValueError(f"unknown logit score {method!r}; choose from {LOGIT_METHODS} (knn needs features)")


def unit_rows(features: np.ndarray) -> np.ndarray:
    """Each row scaled to length 1 (a zero row stays zero), float32."""
    f = features.astype(np.float32)
    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), np.float32(1e-12))


@functools.cache
def _blas() -> ThreadpoolController:
    """The BLAS libraries numpy loaded, found once (threadpoolctl scans the process's libraries)."""
    return ThreadpoolController()


def knn_scores(bank: np.ndarray, features: np.ndarray, k: int) -> np.ndarray:
    """Distance to the k-th nearest of `bank` (normalised features), features normalised first."""
    features, bank = unit_rows(features), bank.astype(np.float32, copy=False)
    k = min(k, len(bank))
    # unit vectors: |a - b|^2 = 2 - 2 a.b, so the k-th nearest is the k-th most similar (a matrix product, in
    # chunks so that thousands of images never hold one huge similarity matrix)
    # one BLAS thread: a request's rows are few, and numpy's BLAS pool would otherwise spin beside torch's (or ONNX
    # Runtime's) threads on the same cores (a knn answer measured 3x slower than one without its score)
    with _blas().limit(limits=1, user_api="blas"):
        similar = np.concatenate(
            [
                -np.partition(-(chunk @ bank.T), k - 1, axis=1)[:, k - 1]
                for chunk in np.split(features, range(1024, len(features), 1024))
            ]
        )
    return np.sqrt(np.clip(2 - 2 * similar, 0, None))


def method_scores(
    method: str, logits: np.ndarray, features: np.ndarray, bank: np.ndarray | None, k: int, temperature: float
) -> np.ndarray:
    """Scores by method name from one pass's logits and features: knn against `bank`, else a logit score."""
    if method == "knn":
        if bank is None:
            raise ValueError("knn needs the training features it compares with")
        return knn_scores(bank, features, k)
    return scores(logits, method, temperature)


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """How often an out-of-distribution image scores above an in-distribution one, ties counted half (1.0: always,
    0.5: chance): the area under the ROC curve as the Mann-Whitney statistic, compared pair by pair in chunks."""
    inside, outside, above = np.ravel(in_scores).astype(np.float64), np.ravel(out_scores).astype(np.float64), 0.0
    for start in range(0, len(outside), 1024):
        pairs = outside[start : start + 1024, None] - inside[None, :]
        above += float((pairs > 0).sum()) + 0.5 * float((pairs == 0).sum())
    return above / max(1, len(inside) * len(outside))


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


def fit_threshold(val_scores: np.ndarray, accept: float) -> float:
    """The score at or below which `accept` of the validation images fall (their `accept` quantile)."""
    if not 0 < accept < 1:
        raise ValueError(f"ood accept={accept} must be in (0, 1): the share of in-distribution images accepted")
    return float(np.quantile(np.asarray(val_scores, np.float64), accept))


def served_record(meta: dict[str, Any], form_record: dict[str, Any] | None) -> OODRecord | None:
    """The OOD record a form answers with: model.json's, with the form's own threshold where export refitted one on
    the same validation images (int8: its scores differ from the eager model's); None for a run from before it."""
    record = OODRecord.from_dict(meta.get("ood"))
    own = (form_record or {}).get("ood_threshold")
    return record if record is None or own is None else replace(record, threshold=float(own))


def calibrated_answer(
    logits: np.ndarray, features: np.ndarray | None, record: OODRecord | None, bank: np.ndarray | None,
    temperature: float,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:  # fmt: skip
    """One forward pass's answer: the calibrated probabilities and, with an OOD record, each image's score and flag
    (score above the threshold). Every consumer answers through this, torch or not."""
    probabilities = softmax(logits, temperature)
    if record is None:
        return probabilities, None, None
    if record.method == "knn":
        if bank is None or record.k is None or features is None:
            raise ValueError(f"the bundle's OOD method is knn but it has no {record.features or 'features file'}")
        s = knn_scores(bank, features, record.k)
    else:
        s = scores(logits, record.method, temperature)
    return probabilities, s, s > record.threshold
