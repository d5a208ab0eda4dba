"""Calibration on a constructed over-confident classifier: the fitted temperature cools it, and the error drops."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from visionapp.train import calibration


def overconfident(n: int, seed: int, scale: float = 4.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels drawn from softmax(logits), so the logits are calibrated by construction; returned x `scale`."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 5, generator=g) * 2
    labels = torch.multinomial(logits.softmax(1), 1, generator=g)[:, 0]
    return logits * scale, labels


def test_temperature_scaling_fixes_an_overconfident_model(tmp_path: Path) -> None:
    val, test = overconfident(4000, 0), overconfident(4000, 1)
    report = calibration.calibrate(val, test)
    assert report["temperature"] == pytest.approx(4, rel=0.1)  # it finds the scale that was put there
    assert report["ece_before"] > 0.15 and report["ece_after"] < 0.03
    assert report["nll_after"] < report["nll_before"]
    accuracy = lambda t: float(((test[0] / t).argmax(1) == test[1]).float().mean())  # noqa: E731
    assert accuracy(report["temperature"]) == accuracy(1.0)  # a temperature never changes a prediction
    calibration.reliability_diagram(*test, report["temperature"], tmp_path / "reliability.png")
    assert (tmp_path / "reliability.png").stat().st_size > 10_000


def test_a_calibrated_model_keeps_a_temperature_near_one() -> None:
    report = calibration.calibrate(overconfident(4000, 2, scale=1), overconfident(4000, 3, scale=1))
    assert report["temperature"] == pytest.approx(1, abs=0.15)
    assert abs(report["ece_after"] - report["ece_before"]) < 0.02
