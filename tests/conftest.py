"""Shared fixtures: an offline network, a private TORCH_HOME, and one small real training run that the
bundle, explain and serve tests reuse (trained once per session through the real CLI)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import run_fit

from visionapp import shapes


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every urllib download fails fast: proxies point at a closed loopback port (no mocking of our code)."""
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home"


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data") / "shapes64"


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, shapes_root: Path) -> Path:
    torch.manual_seed(0)
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))
    runs = tmp_path_factory.mktemp("runs")
    return run_fit(runs, shapes_root, "--trainer.max_epochs=5")


@pytest.fixture(scope="session")
def photos_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shapes.write_photo_folder(tmp_path_factory.mktemp("data") / "photos")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` run where CUDA is, and are skipped with the reason elsewhere (CI has no GPU)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
