"""Shared fixtures: an offline network, a private TORCH_HOME, and one small real training run that the
bundle, explain and serve tests reuse (trained once per session through the real CLI; once for all of
pytest-xdist's workers when make test runs them in parallel)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from filelock import FileLock
from helpers import TINY_COUNTS, TINY_SIZE, run_fit

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


def shared(tmp_path_factory: pytest.TempPathFactory, name: str, make: Callable[[Path], Path]) -> Path:
    """`make(folder)`'s result, made once per test run: under pytest-xdist, in the folder its workers share, by the
    first worker to ask (the others wait for it); without it, in this session's own temporary folder."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the run's folder, above each worker's own
    folder, done = base / f"shared-{name}", base / f"shared-{name}.done"
    with FileLock(base / f"shared-{name}.lock"):
        if not done.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            done.write_text(str(make(folder)))
    return Path(done.read_text())


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Generated here, before any test's fit would (the data modules' own default seed): parallel workers then
    # never write the same data set at once. Every test that trains on it uses these counts (TINY_DATA).
    def generate(folder: Path) -> Path:
        return shapes.generate(folder / "shapes64", seed=0, size=TINY_SIZE, counts=TINY_COUNTS)

    return shared(tmp_path_factory, "data", generate)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, shapes_root: Path) -> Path:
    def train(runs: Path) -> Path:
        torch.manual_seed(0)
        os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))
        return run_fit(runs, shapes_root, "--trainer.max_epochs=4")

    return shared(tmp_path_factory, "runs", train)


@pytest.fixture(scope="session")
def photos_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared(tmp_path_factory, "photos", lambda folder: shapes.write_photo_folder(folder / "photos"))


# The files that take longest (pytest --durations), heaviest first. Under pytest-xdist a worker takes a whole file
# at a time in this order: the longest ones start early instead of running alone at the end.
HEAVIEST = ("test_bench.py", "test_serve_robust.py", "test_serve.py", "test_messy_inputs.py", "test_photos.py",
            "test_train.py", "test_export.py", "test_explain.py", "test_configs.py", "test_launch.py")  # fmt: skip


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Files in the order two workers finish soonest (`run_order`); tests marked `gpu` run where CUDA is, and are
    skipped with the reason elsewhere (CI has no GPU)."""
    items.sort(key=run_order(items))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def run_order(items: list[pytest.Item]) -> Callable[[pytest.Item], tuple[int, int]]:
    """The heaviest file that needs the shared training run first (its worker trains the run at once), then the files
    that need no such run (the other worker's work meanwhile), then the rest; heaviest first within each. A file's
    tests keep their order (the sort is stable)."""
    needs_run = {item.path.name for item in items if "trained_run" in getattr(item, "fixturenames", ())}
    first = next((name for name in HEAVIEST if name in needs_run), None)

    def key(item: pytest.Item) -> tuple[int, int]:
        name = item.path.name
        group = 0 if name == first else 2 if name in needs_run else 1
        return group, HEAVIEST.index(name) if name in HEAVIEST else len(HEAVIEST)

    return key
