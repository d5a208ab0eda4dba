"""Out-of-distribution scores measured after `fit`, side by side, and the served method's threshold fitted.

On the best checkpoint: the logits and penultimate features of the validation and test splits and of each
out-of-distribution set the data module names (the shapes data set: `near`, held-out shapes in the classes' style,
and `far`, images of another kind; a folder run: the folders under its `ood_root`). For each method (visionapp.ood's
logit scores, and k-nearest-neighbour distance on normalised features, Sun et al. 2022, against the train split's
features) metrics.json gets AUROC and FPR at 95% TPR per set; `ood.png` draws the chosen score's histograms.

The served method is chosen among the three on the validation outliers (the training outliers' own validation
split, kinds never used to measure) where the data has them: the one letting fewest through at 95% of validation
images accepted (the flag's own operating point), then by AUROC; else msp, the baseline. Its threshold: the
`accept` quantile of the validation split's scores. knn's training features go into the bundle with it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from visionapp.forms import logits_and_features
from visionapp.ood import FEATURES_FILE, MAX_BANK, METHODS, OODRecord, auroc, fit_threshold, method_scores, unit_rows

KNN_K = 10
TPR = 0.95  # FPR is read where this share of the in-distribution test images is accepted


class Pass(NamedTuple):
    """One split through the model: logits (N, C), penultimate features (N, D) and labels (N)."""

    logits: torch.Tensor
    features: torch.Tensor
    labels: torch.Tensor


@torch.no_grad()
def collect(model: nn.Module, batches: Iterable, transfer: Callable, device: torch.device) -> Pass:
    """Logits, penultimate features and labels of every batch, one forward pass each: after `fit`, the one pass
    over each split that calibration and the out-of-distribution measures share."""
    model.eval()
    logits, features, labels = [], [], []
    for x, y in batches:
        x, y = transfer((x.to(device), y.to(device)))
        out, feats = logits_and_features(model, x)
        logits.append(out.float().cpu())
        features.append(feats.float().cpu())
        labels.append(y.cpu())
    return Pass(torch.cat(logits), torch.cat(features), torch.cat(labels))


def bank_of(train_features: torch.Tensor, size: int = MAX_BANK) -> np.ndarray:
    """The normalised training features knn compares with, at most `size` of them (a seeded sample), rounded to
    float16 as the bundle stores them."""
    if len(train_features) > size:
        train_features = train_features[
            torch.randperm(len(train_features), generator=torch.Generator().manual_seed(0))[:size]
        ]
    return unit_rows(train_features.numpy()).astype(np.float16).astype(np.float32)


def fpr_at_tpr(in_scores: np.ndarray, out_scores: np.ndarray, tpr: float = TPR) -> float:
    """The share of out-of-distribution images accepted where `tpr` of the in-distribution ones are."""
    return float((out_scores <= np.float32(np.quantile(np.asarray(in_scores, np.float64), tpr))).mean())


Scorer = Callable[[str, Pass], np.ndarray]


def scorer(bank: np.ndarray, temperature: float) -> Scorer:
    """Scores of a pass by method name: knn against `bank`, the logit scores at the calibration `temperature`."""

    def score(method: str, p: Pass) -> np.ndarray:
        return method_scores(method, p.logits.numpy(), p.features.numpy(), bank, KNN_K, temperature)

    return score


def method_table(passes: Mapping[str, Pass], sets: list[str], score: Scorer) -> dict[str, dict[str, float]]:
    """Per method: AUROC and FPR at 95% TPR of test against each set, and of val against the validation outliers
    where there are some."""
    methods: dict[str, dict[str, float]] = {}
    for method in METHODS:
        row: dict[str, float] = {}
        pairs = [(name, "test", name) for name in sets]
        if "val_outliers" in passes:
            pairs.append(("val_outliers", "val", "val_outliers"))
        for label, inside, outside in pairs:
            in_scores, out_scores = score(method, passes[inside]), score(method, passes[outside])
            row[f"auroc_{label}"] = round(auroc(in_scores, out_scores), 4)
            row[f"fpr_at_95tpr_{label}"] = round(fpr_at_tpr(in_scores, out_scores), 4)
        methods[method] = row
    return methods


def choose(methods: dict[str, dict[str, float]]) -> tuple[str, str]:
    """The method served and why: the fewest validation outliers let through at the flag's own operating point,
    then AUROC; msp, the baseline, where there are no validation outliers."""
    if not all("fpr_at_95tpr_val_outliers" in row for row in methods.values()):
        return "msp", "default (no validation outliers)"
    key = lambda m: (methods[m]["fpr_at_95tpr_val_outliers"], -methods[m]["auroc_val_outliers"])  # noqa: E731
    return min(METHODS, key=key), "val_outliers"


def measure(
    passes: Mapping[str, Pass], *, sets: list[str], temperature: float, accept: float, plot: Path | None = None
) -> tuple[OODRecord, np.ndarray | None, dict[str, Any]]:
    """From the passes (val, test, train, each set, and val_outliers where the data has them): the served record
    (method, threshold), knn's feature bank when that is the method, and metrics.json's entry."""
    bank = bank_of(passes["train"].features)
    score = scorer(bank, temperature)
    methods = method_table(passes, sets, score)
    chosen, chosen_on = choose(methods)
    by_set = {name: score(chosen, passes[name]) for name in ("val", "test", *sets)}
    threshold = round(fit_threshold(by_set["val"], accept), 6)
    knn = chosen == "knn"
    record = OODRecord(chosen, threshold, accept, k=KNN_K if knn else None, features=FEATURES_FILE if knn else None)
    flagged = {name: round(float((by_set[name] > threshold).mean()), 4) for name in by_set}
    entry: dict[str, Any] = {
        **record.to_dict(),
        "chosen_on": chosen_on,
        "val_accepted": round(1 - flagged["val"], 4),
        "test_accepted": round(1 - flagged["test"], 4),
        **methods[chosen],
        "flagged": {name: flagged[name] for name in sets},
        "sets": {name: len(passes[name].logits) for name in sets},
        "methods": methods,
        "knn_k": KNN_K,
    }
    if plot is not None:
        histogram(plot, {"test (in distribution)": by_set["test"]} | {name: by_set[name] for name in sets}, record)
    return record, bank if knn else None, entry


def histogram(path: Path, by_set: dict[str, np.ndarray], record: OODRecord) -> None:
    """Each set's scores on one axis, and the threshold: what the flag separates, and what it lets through."""
    fig = Figure(figsize=(8, 4.2), layout="constrained")
    ax = fig.subplots()
    everything = np.concatenate(list(by_set.values()))
    bins = np.linspace(float(everything.min()), float(everything.max()), 50).tolist()
    for name, s in by_set.items():
        ax.hist(s.tolist(), bins=bins, alpha=0.5, density=True, label=f"{name} ({len(s)})")
    ax.axvline(
        record.threshold, color="black", linestyle="--", label=f"threshold ({record.accept:.0%} of val accepted)"
    )
    ax.set_xlabel(f"{record.method} score (higher: further from the training data)")
    ax.set_ylabel("density")
    ax.set_title("Out-of-distribution score: in-distribution test images against the out-of-distribution sets")
    ax.legend()
    fig.savefig(path, dpi=110)
