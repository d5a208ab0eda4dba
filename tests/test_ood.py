"""Out-of-distribution scores: the scores and the threshold on their own, then a trained run's record measured
against its own data (the threshold's acceptance, held-out shapes flagged more than test images), and a bundle from
before the scores still loading and serving."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import real_server

from visionapp import shapes
from visionapp.bundle import load_bank, load_bundle
from visionapp.decode import load_image
from visionapp.imagefiles import find_images
from visionapp.ood import FEATURES_FILE, OODRecord, fit_threshold, knn_scores, scores
from visionapp.train.ood import auroc, fpr_at_tpr


def test_scores_rank_a_confident_answer_below_an_unsure_one() -> None:
    logits = np.array([[9.0, 0.0, 0.0], [0.1, 0.0, 0.0]])
    for method in ("msp", "energy"):
        s = scores(logits, method)
        assert s[0] < s[1], method  # higher = further from the training data
    with pytest.raises(ValueError, match="msp"):
        scores(logits, "mahalanobis")


def test_the_numpy_scores_equal_torchs_formulas() -> None:
    """visionapp.ood scores in numpy (the slim predictor has no torch); the formulas as torch writes them agree."""
    g = torch.Generator().manual_seed(0)
    logits, features = torch.randn(40, 5, generator=g) * 4, torch.randn(40, 16, generator=g)
    bank = torch.nn.functional.normalize(torch.randn(300, 16, generator=g), dim=1)
    msp = -(logits / 1.5).softmax(1).amax(1)
    energy = -torch.logsumexp(logits, 1)
    similar = (torch.nn.functional.normalize(features, dim=1) @ bank.T).topk(7, dim=1).values[:, -1]
    knn = (2 - 2 * similar).clamp_min(0).sqrt()
    assert np.allclose(scores(logits.numpy(), "msp", 1.5), msp.numpy(), atol=1e-6)
    assert np.allclose(scores(logits.numpy(), "energy"), energy.numpy(), atol=1e-5)
    assert np.allclose(knn_scores(bank.numpy(), features.numpy(), k=7), knn.numpy(), atol=1e-5)


def test_a_knn_bank_of_either_format_loads_alike(tmp_path: Path) -> None:
    """Runs from before the .npy bank stored it with torch.save (ood_features.pt): both load to the same array."""
    bank = torch.nn.functional.normalize(torch.randn(50, 8), dim=1).half()
    torch.save(bank, tmp_path / "ood_features.pt")
    np.save(tmp_path / FEATURES_FILE, bank.numpy())
    assert np.array_equal(load_bank(tmp_path / "ood_features.pt"), load_bank(tmp_path / FEATURES_FILE))


def test_threshold_accepts_the_share_asked_for() -> None:
    val = np.random.default_rng(0).standard_normal(2000)
    for accept in (0.9, 0.95, 0.99):
        threshold = fit_threshold(val, accept)
        assert float((val <= threshold).mean()) == pytest.approx(accept, abs=1 / len(val))
    with pytest.raises(ValueError, match="accept"):
        fit_threshold(val, 1.0)


def test_auroc_fpr_and_knn_on_known_cases() -> None:
    ins, outs = np.arange(100.0), np.arange(100.0) + 1000
    assert auroc(ins, outs) == 1.0 and auroc(outs, ins) == 0.0
    assert fpr_at_tpr(ins, outs) == 0.0 and fpr_at_tpr(outs, ins) == 1.0
    rng = np.random.default_rng(0)
    ins, outs = rng.integers(-30, 30, 300).astype(float), rng.integers(-20, 40, 200).astype(float)
    pairs = (outs[None, :] > ins[:, None]) + 0.5 * (outs[None, :] == ins[:, None])
    assert auroc(ins, outs) == pytest.approx(float(pairs.mean()), abs=1e-6)  # Mann-Whitney, ties counting half
    bank = np.tile(np.eye(4), (5, 1))  # five copies of each axis
    near, far = np.array([[1.0, 0.01, 0, 0]]), np.array([[1.0, 1.0, 1.0, 1.0]])
    assert knn_scores(bank, near, k=3) < knn_scores(bank, far, k=3)


def test_outliers_for_training_and_sets_for_measuring_never_share_a_kind() -> None:
    assert not set(shapes.OUTLIER_KINDS) & (set(shapes.NEAR_KINDS) | set(shapes.FAR_KINDS))
    assert not set(shapes.CLASSES) & (set(shapes.OUTLIER_KINDS) | set(shapes.NEAR_KINDS))


# --- a trained run -------------------------------------------------------------------------------------------------
def _scores(bundle, files: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        x = torch.stack([bundle.transform(load_image(f)) for f in files])
        _, s, flags = bundle.answer(x)
    assert s is not None and flags is not None
    return s, flags


@pytest.mark.slow
def test_run_records_every_method_and_the_served_threshold(trained_run: Path) -> None:
    ood = json.loads((trained_run / "metrics.json").read_text())["ood"]
    assert ood["method"] in ("msp", "energy", "knn") and ood["accept"] == 0.95
    for method in ("msp", "energy", "knn"):
        for key in ("auroc_near", "auroc_far", "fpr_at_95tpr_near", "fpr_at_95tpr_far"):
            assert 0 <= ood["methods"][method][key] <= 1, (method, key)
    assert ood["auroc_near"] == ood["methods"][ood["method"]]["auroc_near"]
    record = load_bundle(trained_run / "bundle").ood
    assert record == OODRecord.from_dict(ood)  # the bundle serves what metrics.json reports
    if record is not None and record.method == "knn":  # its training features in the bundle, within the stated size
        size = (trained_run / "bundle" / FEATURES_FILE).stat().st_size
        assert size < 5000 * 512 * 2 + 10_000, size
    report = (trained_run / "report.html").read_text()
    assert "Out of distribution" in report and "out-of-distribution scores" in report  # the histogram's alt text


@pytest.mark.slow
def test_threshold_accepts_what_was_asked_on_val_and_test(trained_run: Path) -> None:
    bundle = load_bundle(trained_run / "bundle")
    assert bundle.ood is not None
    root = Path(json.loads((trained_run / "metrics.json").read_text())["data_root"])
    for split in ("val", "test"):
        files = find_images(root / split)
        _, flags = _scores(bundle, files)
        accepted = 1 - float(flags.float().mean())
        # val: the quantile it was fitted on (one image either way); test: the same distribution, so within
        # three standard errors of a binomial share
        tolerance = 1.5 / len(files) if split == "val" else 3 * math.sqrt(0.95 * 0.05 / len(files)) + 1 / len(files)
        assert accepted == pytest.approx(bundle.ood.accept, abs=tolerance), split


@pytest.mark.slow
def test_a_held_out_shape_is_flagged_more_often_than_a_test_image(trained_run: Path) -> None:
    bundle = load_bundle(trained_run / "bundle")
    root = Path(json.loads((trained_run / "metrics.json").read_text())["data_root"])
    _, test_flags = _scores(bundle, find_images(root / "test"))
    _, near_flags = _scores(bundle, find_images(root / "ood" / "near"))
    print(f"\nflagged: test {test_flags.float().mean():.1%}, held-out shapes {near_flags.float().mean():.1%}")
    assert near_flags.float().mean() > test_flags.float().mean()


@pytest.mark.slow
def test_a_bundle_from_before_the_scores_loads_and_serves(trained_run: Path, tmp_path: Path) -> None:
    old = tmp_path / "old-run"
    shutil.copytree(trained_run, old, ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
    meta = json.loads((old / "bundle" / "model.json").read_text())
    del meta["ood"]
    (old / "bundle" / "model.json").write_text(json.dumps(meta))
    bundle = load_bundle(old / "bundle")
    assert bundle.ood is None
    image = find_images(Path(json.loads((old / "metrics.json").read_text())["data_root"]) / "test")[0]
    probabilities, s, flags = bundle.answer(bundle.transform(load_image(image))[None])
    assert s is None and flags is None and probabilities.shape == (1, 5)
    with real_server("torchserve", old, tmp_path) as server:
        status, answer = server.post(image.read_bytes())
    assert status == 200 and isinstance(answer, dict) and len(answer) == 5
