"""The predict stage: a folder scored through Lightning's Trainer.predict, row by row, resumable, across ranks, with
the probabilities load_bundle and the real TorchServe give."""

from __future__ import annotations

import csv
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import MODEL_CONFIG, ROOT
from PIL import Image

from visionapp import shapes
from visionapp.bundle import load_bundle
from visionapp.deploy.archive import build_archive
from visionapp.deploy.local import LocalServer
from visionapp.predict.__main__ import main as predict_main

pytestmark = pytest.mark.slow


def odd_folder(root: Path, trained_run: Path) -> Path:
    """Nested folders of test images in every format the server takes, photo-like JPEGs (EXIF orientation, CMYK,
    grayscale), a corrupt JPEG, a text file, and hidden files that must be skipped."""
    data = Path(json.loads((trained_run / "metrics.json").read_text())["data_root"]) / "test"
    for cls in ("star", "circle", "triangle"):
        for f in sorted((data / cls).glob("*.png"))[:4]:
            (root / "shapes" / cls).mkdir(parents=True, exist_ok=True)
            shutil.copy(f, root / "shapes" / cls / f.name)
    star = Image.open(sorted((data / "star").glob("*.png"))[0]).convert("RGB")
    (root / "formats").mkdir(parents=True)
    star.save(root / "formats" / "star.webp")
    star.save(root / "formats" / "star.gif")
    star.convert("CMYK").save(root / "formats" / "star_cmyk.jpg")
    sixteen = (np.asarray(star.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(sixteen).save(root / "formats" / "star_16bit.png")
    shapes.write_photo_folder(root / "photos", per_class={"val": 4})
    (root / "photos" / "val" / "m_broken.jpg").write_bytes(b"\xff\xd8 not really a JPEG")
    (root / "notes.txt").write_text("which are the ants?")
    (root / ".ipynb_checkpoints").mkdir()
    star.save(root / ".ipynb_checkpoints" / "star-checkpoint.png")
    (root / "formats" / "._star.webp").write_bytes(b"\x00\x05\x16\x07")
    return root


def predict_args(run: Path, images: Path, out: Path, *more: str) -> list[str]:
    return ["--bundle", str(run / "bundle"), "--images", str(images), "--out", str(out), *more]


def read(path: Path) -> list[list[str]]:
    with path.open(newline="") as f:
        return list(csv.reader(f))[1:]


def test_a_folder_of_every_kind_is_scored_as_load_bundle_scores_it(trained_run: Path, tmp_path: Path) -> None:
    root = odd_folder(tmp_path / "photos", trained_run)
    out = tmp_path / "out" / "predictions.csv"
    args = predict_args(trained_run, root, out, "--batch-size", "4", "--workers", "1")
    assert predict_main(args) == 0
    rows, errors = read(out), read(out.with_name("predictions.errors.csv"))
    paths = [r[0] for r in rows]
    assert paths == sorted(paths) and len(set(paths)) == len(paths)
    expected = {f.relative_to(root).as_posix() for f in root.rglob("*") if f.is_file()}
    expected -= {p for p in expected if "/." in "/" + p or p.endswith(".txt") or "broken" in p}
    assert set(paths) == expected  # every image once; hidden files and folders skipped
    assert {e[0] for e in errors} == {"notes.txt", "photos/val/m_broken.jpg"}
    assert "not an image file" in dict(errors)["notes.txt"]
    bundle = load_bundle(trained_run / "bundle")
    assert bundle.ood is not None and len(rows[0]) == 1 + 2 * 5 + 2  # path, top-5 pairs, ood_score, ood
    for row in rows:
        with torch.no_grad():
            probs, scores, flags = bundle.answer(bundle.transform.load(root / row[0])[None])
        for name, p in zip(row[1:11:2], row[2:11:2], strict=True):
            assert abs(float(p) - float(probs[0, bundle.class_names.index(name)])) < 1e-4, row
        assert scores is not None and flags is not None
        assert abs(float(row[11]) - float(scores[0])) < 1e-3 and row[12] == str(bool(flags[0])).lower(), row
    assert not list(out.parent.glob(".*rank*"))  # the shards were merged and removed


def test_strict_stops_at_the_first_bad_file_and_a_rerun_finishes_the_rest(trained_run: Path, tmp_path: Path) -> None:
    """A run stopped halfway (--strict meets the corrupt JPEG after earlier batches were written), then the same
    command without it: every image exactly once, none missing."""
    root = odd_folder(tmp_path / "photos", trained_run)
    (root / "notes.txt").unlink()
    out = tmp_path / "predictions.csv"
    args = predict_args(trained_run, root, out, "--batch-size", "2", "--workers", "0")
    assert predict_main([*args, "--strict"]) == 2  # one `error:` line, exit status 2
    shards = list(tmp_path.glob(".predictions.csv.rank*"))
    assert shards and read(shards[0]), "the batches before the bad file were written"
    written_before = {r[0] for r in read(shards[0])}
    assert predict_main(args) == 0
    paths = [r[0] for r in read(out)]
    images = {f.relative_to(root).as_posix() for f in root.rglob("*") if f.is_file() and "/." not in "/" + str(f)}
    assert len(paths) == len(set(paths)) and set(paths) == images - {"photos/val/m_broken.jpg"}
    assert written_before <= set(paths)


def test_two_processes_through_torchx_score_each_image_once(trained_run: Path, tmp_path: Path) -> None:
    root = odd_folder(tmp_path / "photos", trained_run)
    out = tmp_path / "out" / "predictions.csv"
    r = subprocess.run(
        ["make", "-s", "launch-predict", "NPROC=2", f"RUN={trained_run}", f"IMAGES={root}", f"OUT={out}",
         "ARGS=--batch-size 3 --workers 0"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    alone = tmp_path / "alone.csv"
    assert predict_main(predict_args(trained_run, root, alone, "--workers", "0")) == 0
    two, one = read(out), read(alone)
    assert [r[0] for r in two] == [r[0] for r in one]  # each image once, in the same stable order
    for a, b in zip(two, one, strict=True):
        assert a[1:11:2] == b[1:11:2] and a[12] == b[12]  # classes, and the OOD flag
        assert np.allclose([float(p) for p in a[2:12:2]], [float(p) for p in b[2:12:2]], atol=1e-3), (a, b)
    assert not list(out.parent.glob(".*rank*"))


def test_rows_equal_the_served_answers(trained_run: Path, tmp_path: Path) -> None:
    root = odd_folder(tmp_path / "photos", trained_run)
    out = tmp_path / "predictions.csv"
    assert predict_main(predict_args(trained_run, root, out, "--workers", "0")) == 0
    rows = {r[0]: r for r in read(out)}
    build_archive(trained_run / "bundle", name="classifier", out=tmp_path / "store", model_config=MODEL_CONFIG)
    with LocalServer(tmp_path / "store", tmp_path / "serve", checkout=ROOT) as server:
        for path in ("formats/star_cmyk.jpg", "formats/star_16bit.png", "photos/val/circle/IMG_0003.jpg"):
            status, answer = server.post((root / path).read_bytes(), headers={"X-Topk": "5"})
            assert status == 200, answer
            row = rows[path]
            assert list(answer) == row[1:11:2]  # type: ignore[arg-type]
            for name, p in zip(row[1:11:2], row[2:11:2], strict=True):
                assert abs(answer[name] - float(p)) < 1e-4  # type: ignore[index]


def _five_jpegs(root: Path, trained_run: Path) -> list[Path]:
    data = Path(json.loads((trained_run / "metrics.json").read_text())["data_root"]) / "test"
    files = []
    for i, f in enumerate(sorted((data / "star").glob("*.png"))[:5]):
        target = root / ("a" if i < 3 else "b") / f"{i}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.open(f).convert("RGB").save(target)
        files.append(target)
    return files


def test_a_folder_with_a_link_loop_and_a_link_out_finishes(trained_run: Path, tmp_path: Path) -> None:
    """photos/a/up -> .. (a loop) and photos/b/elsewhere.jpg -> a file outside the folder: the run ends with each
    of the five JPEGs scored once; the outside link is listed in the errors file, and followed when asked."""
    root = tmp_path / "photos"
    _five_jpegs(root, trained_run)
    (root / "a" / "up").symlink_to("..")
    outside = tmp_path / "elsewhere.jpg"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(outside)
    (root / "b" / "elsewhere.jpg").symlink_to(outside)
    out = tmp_path / "out" / "predictions.csv"
    assert predict_main(predict_args(trained_run, root, out, "--workers", "0")) == 0
    assert [r[0] for r in read(out)] == ["a/0.jpg", "a/1.jpg", "a/2.jpg", "b/3.jpg", "b/4.jpg"]
    assert [(path, "not followed" in why) for path, why in read(out.with_name("predictions.errors.csv"))] == [
        ("b/elsewhere.jpg", True)
    ]
    followed = tmp_path / "followed" / "predictions.csv"
    assert predict_main(predict_args(trained_run, root, followed, "--workers", "0", "--follow-links")) == 0
    assert "b/elsewhere.jpg" in [r[0] for r in read(followed)] and len(read(followed)) == 6


def test_one_writer_per_output_and_errors_scored_again(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A second run on an output another live process writes is refused naming it; a lock left by a process that
    is gone is taken over; --retry-errors scores again a file that was half-copied when first scanned."""
    root = tmp_path / "photos"
    files = _five_jpegs(root, trained_run)
    whole = files[0].read_bytes()
    files[0].write_bytes(whole[: len(whole) // 3])  # half-copied
    out = tmp_path / "predictions.csv"
    lock = out.with_name(".predictions.csv.lock")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "command": "make predict-folder"}))
        assert predict_main(predict_args(trained_run, root, out, "--workers", "0")) == 2  # one error line
        assert f"is being written by process {holder.pid} (make predict-folder)" in capsys.readouterr().err
        assert not out.exists() and json.loads(lock.read_text())["pid"] == holder.pid  # its lock left alone
    finally:
        holder.kill()
        holder.wait()
    assert predict_main(predict_args(trained_run, root, out, "--workers", "0")) == 0  # its process is gone
    assert not lock.exists() and len(read(out)) == 4
    assert [r[0] for r in read(out.with_name("predictions.errors.csv"))] == ["a/0.jpg"]
    files[0].write_bytes(whole)  # the copy finished
    assert predict_main(predict_args(trained_run, root, out, "--workers", "0")) == 0
    assert len(read(out)) == 4  # a file in the errors file counts as done ...
    assert predict_main(predict_args(trained_run, root, out, "--workers", "0", "--retry-errors")) == 0
    assert len(read(out)) == 5 and not out.with_name("predictions.errors.csv").exists()  # ... until retried
