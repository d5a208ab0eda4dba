"""model.json and the files it names: read, checked and written without torch (the slim predictor reads a bundle
with Pillow, numpy and ONNX Runtime only; `visionapp.bundle` builds the torch model on top of this).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from visionapp.errors import UserError

FORMS = ("eager", "aoti", "onnx", "onnx-int8")
ONNX_FILES = {"onnx": "model.onnx", "onnx-int8": "model.int8.onnx"}
OUTPUTS = ("logits", "features")

WEIGHTS_FILE, META_FILE = "model.pt", "model.json"
# Beside the bundle in a run directory: the test split's image files, one per line (what explain/ measures on).
TEST_FILES = "test_files.txt"
CARD_FILE = "MODEL_CARD.md"  # in the bundle: the model card the train stage writes (visionapp.train.card)
# Beside the bundle while `fit` runs and after one that did not finish (a crash, Ctrl-C): the run is not to be used.
INCOMPLETE = "INCOMPLETE"


class BundleNotFound(UserError, FileNotFoundError):
    """A path given as a bundle that is not one."""


class IncompleteRun(UserError):
    """The run directory of a fit that did not finish."""


def check_complete(bundle_dir: str | Path) -> None:
    """Refuse the bundle of a run that `fit` did not finish (its INCOMPLETE mark says why)."""
    mark = Path(bundle_dir).parent / INCOMPLETE
    if mark.is_file():
        raise IncompleteRun(
            f"{mark.parent} is an unfinished run ({mark.read_text().strip()}); train again (make train) or pick "
            "a finished run (RUN=runs/<name>)"
        )


def bundle_file(directory: Path, name: str) -> Path:
    """A file that model.json names, as a path inside the bundle: a plain file name, never a path that leads
    elsewhere (a compiled package is native code: one from outside the bundle must not be loaded or packed)."""
    if not name or Path(name).name != name or name in (".", ".."):
        raise ValueError(f"{directory / META_FILE} names the file {name!r}; expected a file name inside the bundle")
    return directory / name


def write_meta(directory: Path, meta: dict[str, Any]) -> None:
    """Write model.json whole or not at all: a temporary file renamed over it (a crash leaves the old one)."""
    tmp = directory / f".{META_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, directory / META_FILE)


def read_meta(directory: Path) -> dict[str, Any]:
    """The bundle's model.json, after refusing an unfinished run's bundle and a folder that is not a bundle."""
    check_complete(directory)
    if not (directory / META_FILE).is_file():
        raise BundleNotFound(
            f"{directory} is not a bundle (no {META_FILE}); train first (make train) "
            "or pass a run's bundle/ folder, e.g. runs/latest/bundle"
        )
    meta: dict[str, Any] = json.loads((directory / META_FILE).read_text())
    return meta


def form_file_problem(directory: Path, record: dict[str, Any] | None, name: str, device: str) -> str | None:
    """Why an exported form's file must not be loaded (None: it may): it is loaded only if it passed its checks at
    export and is the very file checked (its SHA-256; AOTInductor's is native code)."""
    if record is None:
        return f"the bundle has no {name} form for {device} (make export on a {device} machine)"
    if not record.get("passed"):
        return f"it failed its check at export: {record.get('reason', 'no reason recorded')}"
    try:
        path = bundle_file(directory, record["file"])
        if not path.is_file():
            return f"{record['file']} is missing from {directory}"
    except ValueError as e:
        return str(e)
    if record.get("sha256") is None:
        return f"model.json records no SHA-256 for {record['file']}: make export again"
    if file_sha256(path) != record["sha256"]:
        return (f"refused: {record['file']} is not the file make export checked (its SHA-256 differs from "
                "model.json's); make export again")  # fmt: skip
    return None


def file_sha256(path: Path) -> str:
    """The file's SHA-256, hex: what model.json records of a file it names, to refuse one changed since."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fastest(records: dict[str, dict[str, Any]]) -> list[str]:
    """The forms that passed their checks, fastest first by their images/s at export, eager among them (timed
    beside them; last where it was not)."""
    passed = sorted((name for name, r in records.items() if r.get("passed") and name in FORMS),
                    key=lambda name: -float(records[name].get("images_per_s", 0)))  # fmt: skip
    return passed if "eager" in passed else [*passed, "eager"]
