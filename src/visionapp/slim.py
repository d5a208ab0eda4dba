"""The slim predictor: a bundle's ONNX form answering with ONNX Runtime, Pillow and numpy only, no torch.

What a prediction needs once `make export` has written the ONNX forms: decode and resize (`visionapp.decode`, the
same code every torch consumer runs), the forward pass (ONNX Runtime), the calibration temperature, and the
out-of-distribution score and flag from the form's two outputs (`visionapp.ood`, numpy). `load_slim` picks the fastest
ONNX form that passed its checks at export (int8 where it did), refusing a file whose SHA-256 is not the one checked,
as `load_bundle` does. A serving image built on this holds no torch (an import contract in pyproject.toml says so);
explanations need the eager model and Captum, so they are answered where torch is.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from visionapp.decode import decode_side, normalize, resize
from visionapp.errors import UserError
from visionapp.manifest import (
    CARD_FILE,
    META_FILE,
    ONNX_FILES,
    OUTPUTS,
    bundle_file,
    fastest,
    form_file_problem,
    read_meta,
)
from visionapp.ood import OODRecord, calibrated_answer, served_record


class OnnxSession:
    """An ONNX form in an ONNX Runtime session on the CPU: a normalised float32 batch (N, 3, H, W) in, (logits,
    features) out, with `threads` intra-op threads."""

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort  # imported when an ONNX form is loaded: a bundle without one needs none

        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        # No spinning: ONNX Runtime's threads otherwise busy-wait after each run, taking the cores from what runs
        # next (the OOD score, the next request's decoding). Measured with a knn bundle on 2 busy cores: a lone
        # answer 11.1 → 7.1 ms, the score's share 1.21 → 1.18 of the answer without it.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        names = [o.name for o in self.session.get_outputs()]
        if tuple(names) != OUTPUTS:
            raise ValueError(f"{path.name} has outputs {names}, expected {list(OUTPUTS)}: make export again")

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, features = self.session.run(None, {self.input: np.ascontiguousarray(x, np.float32)})
        return logits, features


@dataclass
class SlimBundle:
    """A bundle's metadata and one loaded ONNX form: what the servers' prediction path asks of a bundle."""

    meta: dict[str, Any]
    session: OnnxSession
    form: str
    form_note: str
    ood_bank: np.ndarray | None = None

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    @property
    def image_size(self) -> int:
        return int(self.meta["image_size"])

    @property
    def decode_side(self) -> int:
        return decode_side(self.image_size)

    @property
    def temperature(self) -> float:
        return float(self.meta.get("temperature", 1.0))

    @property
    def ood(self) -> OODRecord | None:
        return served_record(self.meta, self.meta["forms"]["cpu"][self.form])

    def geometry(self, img: Image.Image) -> np.ndarray:
        """An RGB image as the model's uint8 input (3, size, size)."""
        return resize(img, self.image_size)

    def answer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """uint8 images (N, 3, size, size): calibrated probabilities, and the OOD scores and flags (None without
        an OOD record), from one forward pass of the form."""
        logits, features = self.session(normalize(images, self.meta["mean"], self.meta["std"]))
        return calibrated_answer(logits, features, self.ood, self.ood_bank, self.temperature)


def load_slim(directory: str | Path, runtime: str = "auto", threads: int | None = None) -> SlimBundle:
    """The bundle's ONNX form `runtime` names ("onnx", "onnx-int8"), or under "auto" the fastest ONNX form that
    passed its checks; a UserError saying why when none can run (no ONNX form exported: make export)."""
    directory = Path(directory)
    meta = read_meta(directory)
    if runtime not in ("auto", *ONNX_FILES):
        raise UserError(f"the slim predictor runs the ONNX forms: runtime {runtime!r} is not one of auto, "
                        f"{', '.join(ONNX_FILES)}")  # fmt: skip
    records = meta.get("forms", {}).get("cpu", {})
    names = [n for n in fastest(records) if n in ONNX_FILES] if runtime == "auto" else [runtime]
    problems = {n: form_file_problem(directory, records.get(n), n, "cpu") for n in names}
    usable = [n for n in names if problems[n] is None]
    if not usable:
        why = "; ".join(f"{n}: {p}" for n, p in problems.items()) or "no ONNX form passed its checks"
        raise UserError(f"{directory} has no ONNX form the slim predictor can run ({why}); run make export")
    form = usable[0]
    session = OnnxSession(bundle_file(directory, records[form]["file"]), threads or os.cpu_count() or 1)
    bundle = SlimBundle(meta, session, form, f"{form}: {records[form]['file']}, on ONNX Runtime without torch")
    record = bundle.ood
    if record is not None and record.features:
        bank = bundle_file(directory, record.features)
        if bank.suffix != ".npy":
            raise UserError(f"{bank} is knn's feature bank as torch saved it (a run from before the .npy bank); "
                            "make export converts it for the slim predictor")  # fmt: skip
        bundle.ood_bank = np.load(bank, allow_pickle=False).astype(np.float32)
    return bundle


def stage(directory: str | Path, runtime: str = "auto") -> list[str]:
    """Keep in `directory`, a copy of a bundle for the slim image, only what the slim predictor reads with
    `runtime`: model.json, the ONNX form load_slim picks (loaded and checked here, so a bundle it cannot run fails
    the build, not the pod), knn's features and the model card. The names of the files removed."""
    directory = Path(directory)
    bundle = load_slim(directory, runtime, threads=1)
    keep = {META_FILE, CARD_FILE, bundle.meta["forms"]["cpu"][bundle.form]["file"]}
    if bundle.ood is not None and bundle.ood.features:
        keep.add(bundle.ood.features)
    removed = sorted(p.name for p in directory.iterdir() if p.is_file() and p.name not in keep)
    for name in removed:
        (directory / name).unlink()
    return removed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Stage a copy of a bundle for the slim image (make image-serve "
                                 "SERVER=kserve SLIM=1): only what the slim predictor reads stays.")  # fmt: skip
    ap.add_argument("bundle", help="the copy to prune (never the run's own bundle)")
    ap.add_argument("--model-config", help="the model config the image serves with: its runtime picks the form")
    args = ap.parse_args(argv)
    runtime = "auto"
    if args.model_config:
        runtime = str((yaml.safe_load(Path(args.model_config).read_text()) or {}).get("runtime", "auto"))
    try:
        removed = stage(args.bundle, runtime)
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"staged {args.bundle} for the slim image: removed {', '.join(removed) or 'nothing'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
