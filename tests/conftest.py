"""Shared fixtures: an offline network, a private TORCH_HOME, and one small real training run that the
bundle, explain and serve tests reuse (trained once per session through the real CLI)."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import pytest
import torch

from visionapp import shapes
from visionapp.train.cli import cli_main

ROOT = Path(__file__).parents[1]

# Small enough for 2 CPU cores, big enough that the model really learns (resnet18 at 64 px: 2x2 last map).
TINY_DATA = [
    "--data.init_args.image_size=64",
    "--data.init_args.num_train=1500",
    "--data.init_args.num_val=100",
    "--data.init_args.num_test=100",
    "--data.init_args.num_workers=0",
]


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


def fit(runs_dir: Path, *args: str) -> Path:
    """`python -m visionapp fit *args` in this process, offline weights, into runs_dir; returns the run."""
    cli_main(["fit", *args, "--model.weights=null", f"--runs_dir={runs_dir}", "--trainer.enable_model_summary=false"])
    return (runs_dir / "latest").resolve()


def run_fit(runs_dir: Path, shapes_root: Path, *extra: str) -> Path:
    """Train the default config on tiny shapes through the real LightningCLI entry point."""
    return fit(runs_dir, "--config=configs/train.yaml", f"--data.init_args.root={shapes_root}", *TINY_DATA, *extra)


class Interrupted(RuntimeError):
    pass


class InterruptAt(L.Callback):
    """Fails at the start of `epoch`, as a crash or a pre-empted job would (last.ckpt holds the epoch before)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            raise Interrupted(f"interrupted at the start of epoch {self.epoch}")


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
