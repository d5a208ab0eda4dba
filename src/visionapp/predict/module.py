"""The bundle as a LightningModule for `Trainer.predict`: the same calibrated probabilities as `load_bundle` and
the server (the compiled model where it fits this device, as the server does)."""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import torch

from visionapp.bundle import Bundle
from visionapp.predict.folder import Batch


@dataclass
class Scores:
    indices: list[int]  # positions in the file list
    probabilities: torch.Tensor  # (n, k) calibrated, highest first
    classes: torch.Tensor  # (n, k) class indices
    failures: list[tuple[int, str]]
    ood_scores: torch.Tensor | None = None  # (n,) with an OOD record in the bundle
    ood_flags: torch.Tensor | None = None


class BundlePredictor(L.LightningModule):
    def __init__(self, bundle: Bundle, topk: int) -> None:
        super().__init__()
        self.bundle, self.topk = bundle, topk
        self.model = bundle.model  # registered, so the trainer moves it to the device

    def predict_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> Scores:
        if not batch.indices:
            empty = torch.empty(0, self.topk)
            return Scores([], empty, empty.long(), batch.failures)
        x = self.bundle.transform.normalize(batch.images.to(self.device))
        probabilities, scores, flags = self.bundle.answer(x)  # one forward pass
        p, c = probabilities.float().topk(self.topk, dim=1)
        ood = (scores.cpu(), flags.cpu()) if scores is not None and flags is not None else (None, None)
        return Scores(batch.indices, p.cpu(), c.cpu(), batch.failures, *ood)

    def transfer_batch_to_device(self, batch: Batch, device: torch.device, dataloader_idx: int) -> Batch:
        return Batch(batch.images.to(device, non_blocking=True), batch.indices, batch.failures)
