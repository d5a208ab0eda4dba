"""The folders, files and runs people really have: Jupyter's and macOS's leftovers, GIF-only classes, one class,
run names that would overwrite or escape, interrupted fits, refused exports. Each gets a right answer or one
readable line (exit status 2), and nothing a user made is lost."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import ROOT, TINY_DATA, InterruptAt, Interrupted, fit, run_fit, write_image
from PIL import Image

from visionapp import imagefiles
from visionapp.bundle import load_bundle
from visionapp.decode import load_image
from visionapp.deploy.archive import build_archive
from visionapp.manifest import INCOMPLETE, IncompleteRun
from visionapp.train.data import DataError, FolderDataModule, ImageFolder, LoaderConfig
from visionapp.train.model import build_model

CLASSES = ("ants", "bees", "wasps")


def messy_folder(root: Path) -> Path:
    """root/train|val/<class>/ photos with what real folders hold beside them: a Jupyter checkpoint folder of
    photos (hidden: not a class), an AppleDouble `._` file per photo (not an image, whatever its name), a
    .DS_Store, and a class of GIFs only."""
    for split, n in (("train", 6), ("val", 3)):
        for c, name in enumerate(CLASSES):
            for i in range(n):
                colour = (80 * c, 20 * i, 200 - 60 * c)
                if name == "wasps":
                    path = root / split / name / f"IMG_{i:04d}.gif"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    Image.new("RGB", (48, 40), colour).save(path)
                else:
                    path = write_image(root / split / name / f"IMG_{i:04d}.jpg", colour, (48, 40))
                (path.parent / f"._{path.name}").write_bytes(b"\x00\x05\x16\x07" + b"\x00" * 60)  # AppleDouble
            (root / split / name / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
        checkpoints = root / split / ".ipynb_checkpoints"
        for i in range(2):
            write_image(checkpoints / f"IMG_{i:04d}-checkpoint.jpg", (0, 255, 0))
    return root


def test_one_rule_finds_classes_and_images_everywhere(tmp_path: Path) -> None:
    root = messy_folder(tmp_path / "photos")
    assert imagefiles.find_classes(root / "train") == list(CLASSES)  # .ipynb_checkpoints is not a class
    images = imagefiles.find_images(root / "train")
    assert len(images) == 18 and not [p for p in images if "._" in p.name or ".ipynb" in str(p)]
    assert Counter(p.suffix for p in images) == {".jpg": 12, ".gif": 6}
    folder = ImageFolder(root / "train", loader=load_image)
    assert folder.classes == list(CLASSES) and len(folder) == 18
    for path, label in folder.samples:  # every label is its folder's class: nothing shifted
        assert CLASSES[label] == Path(path).parent.name
    assert imagefiles.expand([root / "val" / "bees", root / "val" / "ants" / "._IMG_0000.jpg"])[-1].name.startswith(
        "._"
    )  # a file named on the command line is taken as given (and then fails as an image, by name)


@pytest.mark.slow
def test_a_messy_folder_trains_with_every_label_right(tmp_path: Path) -> None:
    root = messy_folder(tmp_path / "photos")
    dm = FolderDataModule(
        root, image_size=32, batch_size=4, loader=LoaderConfig(num_workers=0, cache_dir=str(tmp_path / "cache"))
    )
    assert dm.class_names == list(CLASSES)
    dm.prepare_data()
    dm.setup("fit")
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 15, "val": 9, "test": 3}
    for split in ("val", "test"):
        labels = [int(y) for _, y in dm.splits[split]]
        folders = [Path(f).parent.name for f in dm.split_files(split)]
        assert [CLASSES[y] for y in labels] == folders
    run = fit(
        tmp_path / "runs", "--config=configs/train.yaml", "--config=configs/folder.yaml",
        f"--data.init_args.root={root}", "--data.init_args.image_size=32", "--data.init_args.loader.num_workers=0",
        f"--data.init_args.loader.cache_dir={tmp_path / 'c'}", "--trainer.max_epochs=1", "--run_name=messy",
    )  # fmt: skip
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["class_names"] == list(CLASSES) and not (run / INCOMPLETE).exists()


def test_one_class_is_refused_before_the_model_is_built(tmp_path: Path) -> None:
    for i in range(4):
        write_image(tmp_path / "one" / "ants" / f"{i}.jpg")
    with pytest.raises(DataError, match=r"one class folder \(ants\); a classifier needs at least two"):
        _ = FolderDataModule(tmp_path / "one").class_names


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "visionapp", "fit", "--config=configs/train.yaml", "--config=configs/folder.yaml",
         "--model.weights=null", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})},
    )  # fmt: skip


@pytest.mark.slow
def test_data_errors_are_one_line_with_exit_status_2(tmp_path: Path) -> None:
    for i in range(4):
        write_image(tmp_path / "one" / "ants" / f"{i}.jpg")
    r = cli(f"--data.init_args.root={tmp_path / 'one'}", f"--runs_dir={tmp_path / 'runs'}")
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in r.stderr
    assert "one class folder (ants)" in r.stderr and not (tmp_path / "runs").exists()
    r = cli(f"--data.init_args.root={tmp_path / 'one'}", f"--runs_dir={tmp_path / 'runs'}", "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr and "DataError" in r.stderr  # --debug shows it
    root = messy_folder(tmp_path / "broken")
    (root / "train" / "bees" / "IMG_0001.jpg").write_bytes(b"not a JPEG")
    r = cli(f"--data.init_args.root={root}", f"--data.init_args.loader.cache_dir={tmp_path / 'c'}", "--run_name=x",
            f"--runs_dir={tmp_path / 'runs'}")  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "IMG_0001.jpg cannot be read as an image" in r.stderr and "delete or replace" in r.stderr
    r = cli(f"--data.init_args.root={root}", f"--runs_dir={tmp_path / 'runs'}", env={"VISIONAPP_DEBUG": "1"})
    assert "Traceback" in r.stderr


@pytest.mark.parametrize("name", ["latest", "../escaped", "a/b", ".hidden", ""])
def test_run_names_that_are_not_a_folder_are_refused(tmp_path: Path, name: str) -> None:
    from visionapp.errors import UserError
    from visionapp.train.run import claim_run_dir

    with pytest.raises(UserError, match="is not a run folder's name"):
        claim_run_dir(tmp_path / "runs", name, "resnet18")
    assert not (tmp_path / "escaped").exists()


def test_a_run_is_never_overwritten(tmp_path: Path) -> None:
    from visionapp.errors import UserError
    from visionapp.train.run import claim_run_dir

    first = claim_run_dir(tmp_path, "mine", "resnet18")
    (first / "keep.txt").write_text("my model")
    with pytest.raises(UserError, match="exists: a run is never overwritten"):
        claim_run_dir(tmp_path, "mine", "resnet18")
    assert (first / "keep.txt").read_text() == "my model"
    same_second = {claim_run_dir(tmp_path, None, "resnet18").name for _ in range(3)}  # default names: a suffix
    assert len(same_second) == 3 and all(INCOMPLETE in os.listdir(tmp_path / n) for n in same_second)


@pytest.mark.slow
def test_a_crashed_fit_is_marked_and_refused_by_archive(shapes_root: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    with pytest.raises(Interrupted):
        run_fit(runs, shapes_root, "--trainer.max_epochs=3", "--trainer.limit_train_batches=2", "--run_name=crashed",
            '--trainer.callbacks+={"class_path": "helpers.InterruptAt", "init_args": {"epoch": 1}}')  # fmt: skip
    assert InterruptAt  # the callback the config names
    run = runs / "crashed"
    assert (run / INCOMPLETE).is_file() and not (runs / "latest").exists()
    (run / "bundle").mkdir(exist_ok=True)  # even with bundle files in it
    with pytest.raises(IncompleteRun, match="unfinished run"):
        build_archive(run / "bundle", out=tmp_path / "store", model_config=ROOT / "serve" / "model-config.yaml")
    with pytest.raises(IncompleteRun):
        load_bundle(run / "bundle")
    r = subprocess.run(["make", "-s", "archive", f"RUN={run}", f"MODEL_STORE={tmp_path / 'store'}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode != 0 and "error: " in r.stderr and "unfinished run" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_ctrl_c_during_fit_leaves_the_run_marked(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "visionapp", "fit", "--config=configs/train.yaml",
         f"--data.init_args.root={tmp_path / 'shapes'}", *TINY_DATA, "--data.init_args.num_train=150",
         "--data.init_args.num_val=30", "--data.init_args.num_test=30",  # short epochs: an epoch's end comes soon
         "--model.weights=null", "--trainer.max_epochs=100", f"--runs_dir={tmp_path / 'runs'}", "--run_name=cut"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        # Ctrl-C's default, whoever started the suite: a shell's background job inherits SIGINT ignored, and Python
        # then never raises KeyboardInterrupt (the fit would train on, all 100 epochs)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    checkpoint = tmp_path / "runs" / "cut" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 240
    try:
        while not checkpoint.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)  # an epoch or more in: a run worth keeping
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()  # never a fit left training behind a failed test
    assert proc.returncode != 0, out
    run = tmp_path / "runs" / "cut"
    assert (run / INCOMPLETE).is_file() and checkpoint.is_file(), out
    assert not (tmp_path / "runs" / "latest").exists() and not (run / "bundle").exists()


def test_make_clean_keeps_runs_and_clean_runs_asks(tmp_path: Path) -> None:
    (tmp_path / "runs" / "mine").mkdir(parents=True)
    (tmp_path / "model_store").mkdir()
    make = ["make", "-s", "-f", str(ROOT / "Makefile"), "-C", str(tmp_path)]
    subprocess.run([*make, "clean"], check=True, capture_output=True, timeout=60)
    assert (tmp_path / "runs" / "mine").is_dir() and not (tmp_path / "model_store").exists()
    r = subprocess.run([*make, "clean-runs"], input="n\n", capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "mine" in r.stdout and (tmp_path / "runs" / "mine").is_dir()
    r = subprocess.run([*make, "clean-runs", "CONFIRM=yes"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "deleted runs/" in r.stdout and not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_model_json_file_names_stay_inside_the_bundle(trained_run: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "run" / "bundle"
    shutil.copytree(trained_run / "bundle", bundle)
    outside = tmp_path / "model.cpu.pt2"
    outside.write_bytes(b"native code from elsewhere")
    meta = json.loads((bundle / "model.json").read_text())
    for name in ("../model.cpu.pt2", str(outside)):
        record = {"file": name, "device": "cpu", "torch": torch.__version__, "cpu_isa": "", "batch": [1, 8],
                  "passed": True, "sha256": "0"}  # fmt: skip
        (bundle / "model.json").write_text(json.dumps({**meta, "forms": {"cpu": {"aoti": record}}}))
        b = load_bundle(bundle, runtime="auto")
        assert b.form == "eager" and "expected a file name inside the bundle" in b.form_note
        with pytest.raises(ValueError, match="expected a file name inside the bundle"):
            build_archive(bundle, out=tmp_path / "store", model_config=ROOT / "serve" / "model-config.yaml")


def test_pretrained_weights_from_the_cache_are_loaded_as_data_only(torch_home: Path, offline: None) -> None:
    """A file the offline message tells users to put in the hub cache is unpickled with weights_only: a pickle
    that would run code is refused (the model then starts from random weights, saying why)."""
    from torchvision.models import get_model_weights

    url = get_model_weights("resnet18")["DEFAULT"].url
    cached = torch_home / "hub" / "checkpoints" / os.path.basename(url)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(pickle.dumps(argparse.Namespace(a=1)))  # an object: unpickling it would run its code
    _, info = build_model("resnet18", num_classes=3, weights="DEFAULT")
    assert not info.pretrained and "Unpickl" in (info.reason or ""), info


@pytest.mark.parametrize("module", ["visionapp.explain", "visionapp.run_report"])
def test_the_other_entry_points_name_a_missing_or_unfinished_run_in_one_line(module: str, tmp_path: Path) -> None:
    (tmp_path / "run" / "bundle").mkdir(parents=True)
    (tmp_path / "run" / "metrics.json").write_text("{}")
    (tmp_path / "run" / INCOMPLETE).write_text("fit started and has not finished\n")
    r = subprocess.run([sys.executable, "-m", module, "--run", str(tmp_path / "run")], capture_output=True, text=True,
                       timeout=120)  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "unfinished run" in r.stderr
