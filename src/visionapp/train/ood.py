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
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from torchmetrics.functional.classification import binary_auroc

from visionapp.ood import (
    FEATURES_FILE,
    MAX_BANK,
    METHODS,
    OODRecord,
    fit_threshold,
    knn_scores,
    logits_and_features,
    scores,
)

KNN_K = 10
TPR = 0.95  # FPR is read where this share of the in-distribution test images is accepted


@torch.no_grad()
def collect(model: nn.Module, batches: Iterable, transfer: Callable, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Logits (N, C) and penultimate features (N, D) of every batch, one forward pass each."""
    model.eval()
    logits, features = [], []
    for x, y in batches:
        x, _ = transfer((x.to(device), y.to(device)))
        out, feats = logits_and_features(model, x)
        logits.append(out.float().cpu())
        features.append(feats.float().cpu())
    return torch.cat(logits), torch.cat(features)


def bank_of(train_features: torch.Tensor, size: int = MAX_BANK) -> torch.Tensor:
    """The normalised training features knn compares with, at most `size` of them (a seeded sample), rounded to
    float16 as the bundle stores them."""
    if len(train_features) > size:
        train_features = train_features[
            torch.randperm(len(train_features), generator=torch.Generator().manual_seed(0))[:size]
        ]
    return F.normalize(train_features, dim=1).half().float()


def auroc(in_scores: torch.Tensor, out_scores: torch.Tensor) -> float:
    """How often an out-of-distribution image scores above an in-distribution one (1.0: always, 0.5: chance)."""
    preds = torch.cat([in_scores, out_scores]).double()
    # as ranks in [0, 1], ties kept: torchmetrics reads scores outside [0, 1] as logits, and its sigmoid would turn
    # large scores into ties
    _, ranks = torch.unique(preds, return_inverse=True)
    target = torch.cat([torch.zeros(len(in_scores)), torch.ones(len(out_scores))]).long()
    return float(binary_auroc(ranks.double() / max(1, int(ranks.max())), target))


def fpr_at_tpr(in_scores: torch.Tensor, out_scores: torch.Tensor, tpr: float = TPR) -> float:
    """The share of out-of-distribution images accepted where `tpr` of the in-distribution ones are."""
    return float((out_scores <= torch.quantile(in_scores.double(), tpr).float()).float().mean())


def measure(
    model: nn.Module,
    *,
    val: DataLoader | Iterable,
    test: DataLoader | Iterable,
    train: Iterable,
    sets: Mapping[str, Iterable],
    val_outliers: Iterable | None,
    transfer: Callable,
    device: torch.device,
    temperature: float,
    accept: float,
    plot: Path | None = None,
) -> tuple[OODRecord, torch.Tensor | None, dict[str, Any]]:
    """The served record (method, threshold), knn's feature bank when that is the method, metrics.json's entry."""
    run = {
        name: collect(model, batches, transfer, device)
        for name, batches in {"val": val, "test": test, "train": train, **sets}.items()
    }
    outliers = collect(model, val_outliers, transfer, device) if val_outliers is not None else None
    bank = bank_of(run["train"][1])

    def score(method: str, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        if method == "knn":
            return knn_scores(bank, features, KNN_K)
        return scores(logits, method, temperature)

    methods: dict[str, dict[str, float]] = {}
    for method in METHODS:
        test_scores = score(method, *run["test"])
        row: dict[str, float] = {}
        for name in sets:
            out_scores = score(method, *run[name])
            row[f"auroc_{name}"] = round(auroc(test_scores, out_scores), 4)
            row[f"fpr_at_95tpr_{name}"] = round(fpr_at_tpr(test_scores, out_scores), 4)
        if outliers is not None:
            val_scores, outlier_scores = score(method, *run["val"]), score(method, *outliers)
            row["auroc_val_outliers"] = round(auroc(val_scores, outlier_scores), 4)
            row["fpr_at_95tpr_val_outliers"] = round(fpr_at_tpr(val_scores, outlier_scores), 4)
        methods[method] = row

    if outliers is not None:  # the fewest outliers let through at the flag's own operating point, then AUROC
        key = lambda m: (methods[m]["fpr_at_95tpr_val_outliers"], -methods[m]["auroc_val_outliers"])  # noqa: E731
        chosen, chosen_on = min(METHODS, key=key), "val_outliers"
    else:
        chosen, chosen_on = "msp", "default (no validation outliers)"
    val_scores = score(chosen, *run["val"])
    threshold = round(fit_threshold(val_scores, accept), 6)
    if chosen == "knn":
        record = OODRecord(chosen, threshold, accept, k=KNN_K, features=FEATURES_FILE)
    else:
        record = OODRecord(chosen, threshold, accept)
    test_flags = score(chosen, *run["test"]) > record.threshold
    entry: dict[str, Any] = {
        **record.to_dict(),
        "chosen_on": chosen_on,
        "val_accepted": round(float((val_scores <= record.threshold).float().mean()), 4),
        "test_accepted": round(1 - float(test_flags.float().mean()), 4),
        **{k: v for k, v in methods[chosen].items()},
        "flagged": {
            name: round(float((score(chosen, *run[name]) > record.threshold).float().mean()), 4) for name in sets
        },
        "sets": {name: len(run[name][0]) for name in sets},
        "methods": methods,
        "knn_k": KNN_K,
    }
    if plot is not None:
        histogram(plot, {"test (in distribution)": score(chosen, *run["test"])}
                  | {name: score(chosen, *run[name]) for name in sets}, record)  # fmt: skip
    return record, bank if chosen == "knn" else None, entry


def histogram(path: Path, by_set: dict[str, torch.Tensor], record: OODRecord) -> None:
    """Each set's scores on one axis, and the threshold: what the flag separates, and what it lets through."""
    fig = Figure(figsize=(8, 4.2), layout="constrained")
    ax = fig.subplots()
    everything = torch.cat(list(by_set.values()))
    bins = torch.linspace(float(everything.min()), float(everything.max()), 50).tolist()
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
