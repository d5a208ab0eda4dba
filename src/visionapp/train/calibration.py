"""Calibration: are the model's probabilities right as often as they say? Temperature scaling (Guo et al. 2017):
one scalar T, fitted on the validation split by LBFGS on the negative log-likelihood, divides the logits; the
expected calibration error (15 bins, torchmetrics) and a reliability diagram on the test split, before and after.
"""

from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch.nn import functional as F
from torchmetrics.functional.classification import multiclass_calibration_error

BINS = 15


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T > 0 that minimises the NLL of softmax(logits / T) (optimised as log T, so T stays positive)."""
    log_t = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.exp())


def ece(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    probs = (logits / temperature).softmax(1)
    return float(multiclass_calibration_error(probs, labels, num_classes=logits.shape[1], n_bins=BINS, norm="l1"))


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    return float(F.cross_entropy(logits / temperature, labels))


def calibrate(val: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
    """Fit T on `val`, measure on `test`: metrics.json's `calibration` entry."""
    t = fit_temperature(*val)
    return {
        "temperature": round(t, 4),
        "ece_before": ece(*test),
        "ece_after": ece(*test, temperature=t),
        "nll_before": nll(*test),
        "nll_after": nll(*test, temperature=t),
        "bins": BINS,
    }


def reliability_diagram(logits: torch.Tensor, labels: torch.Tensor, temperature: float, path: Path) -> None:
    """Accuracy against confidence per bin, before and after scaling; the gap to the diagonal is the error."""
    fig = Figure(figsize=(10, 4.6), layout="constrained")
    edges = torch.linspace(0, 1, BINS + 1)
    for ax, t, name in zip(
        fig.subplots(1, 2), (1.0, temperature), ("raw", f"temperature {temperature:.2f}"), strict=True
    ):
        conf, pred = (logits / t).softmax(1).max(1)
        correct = (pred == labels).float()
        bin_of = torch.bucketize(conf, edges[1:-1])
        acc = [correct[bin_of == b].mean().item() if (bin_of == b).any() else 0.0 for b in range(BINS)]
        counts = [int((bin_of == b).sum()) for b in range(BINS)]
        ax.bar(edges[:-1], acc, width=1 / BINS, align="edge", edgecolor="black", label="accuracy")
        ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (max probability)", ylabel="accuracy")
        ax.set_title(f"{name}: ECE {ece(logits, labels, t):.3f}, {sum(counts)} test images")
        ax.legend(loc="upper left")
    fig.savefig(path, dpi=100)
