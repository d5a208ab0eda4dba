"""The serving core's engine on torch: the bundle in the form the model config names (eager, AOTInductor or an ONNX
form through `load_bundle`), answering uint8 batches with numpy, as the slim predictor (`visionapp.slim`) does
without torch. Explanations need this engine: Captum explains the eager model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from visionapp.bundle import Bundle, load_bundle
from visionapp.ood import OODRecord


class TorchEngine:
    def __init__(self, model_dir: str | Path, device: str, runtime: str, threads: int) -> None:
        if device == "cpu":
            # Share the cores between this model's workers instead of each worker taking all of them (or as many
            # as the config says: an explanation worker leaves the rest to the predictions).
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.bundle: Bundle = load_bundle(model_dir, map_location=self.device, runtime=runtime)
        self.bundle.model.to(self.device)

    @property
    def meta(self) -> dict[str, Any]:
        return self.bundle.meta

    @property
    def form_note(self) -> str:
        return self.bundle.form_note

    @property
    def class_names(self) -> list[str]:
        return self.bundle.class_names

    @property
    def image_size(self) -> int:
        return self.bundle.transform.image_size

    @property
    def decode_side(self) -> int:
        return self.bundle.transform.decode_side

    @property
    def ood(self) -> OODRecord | None:
        return self.bundle.ood

    def answer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """uint8 images (N, 3, size, size): calibrated probabilities and the OOD scores and flags, as numpy."""
        with torch.inference_mode():
            x = self.bundle.transform.normalize(torch.from_numpy(images).to(self.device))
            probabilities, scores, flags = self.bundle.answer(x)
        return (probabilities.numpy(), None if scores is None else scores.numpy(),
                None if flags is None else flags.numpy())  # fmt: skip
