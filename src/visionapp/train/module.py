"""The LightningModule: loss, torchmetrics, optimiser and schedule around the plain model (model.py)."""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from visionapp.decode import IMAGENET_MEAN, IMAGENET_STD
from visionapp.train.model import PretrainedInfo, backbone_modules, build_model
from visionapp.train.schedule import WarmupCosine, run_length_kwargs


class ImageClassifier(L.LightningModule):
    """Fine-tunes a torchvision classifier.

    class_names, image_size, mean and std are linked from the DataModule by the CLI, so they are saved
    with the hyper-parameters and the bundle can rebuild the exact preprocessing.
    """

    def __init__(
        self,
        arch: str = "resnet18",
        weights: str | None = "DEFAULT",
        weights_file: str | None = None,
        require_pretrained: bool = False,
        class_names: Sequence[str] = ("a", "b"),
        image_size: int = 224,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable = WarmupCosine,
        label_smoothing: float = 0.0,
        outlier_weight: float = 0.5,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.class_names = list(class_names)
        n = len(self.class_names)
        self.model, info = build_model(
            arch,
            n,
            weights=weights,
            weights_file=weights_file,
            require_pretrained=require_pretrained,
            image_size=image_size,
        )
        self.pretrained_info = info
        if compile:
            # torch.compile in place: the state_dict keys stay those of the plain model, so checkpoints and the
            # bundle do not change. Off by default: not faster here (docs/performance.md).
            self.model.compile()
        self.optimizer, self.scheduler = optimizer, scheduler
        self.loss = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.outlier_weight = outlier_weight
        # One metric object per split (torchmetrics keeps state per object and syncs it across DDP ranks).
        self.train_acc = MulticlassAccuracy(n, average="micro")
        self.val_acc = MulticlassAccuracy(n, average="micro")
        self.test_acc = MulticlassAccuracy(n, average="micro")
        self.test_acc_per_class = MulticlassAccuracy(n, average=None)
        self.test_confusion = MulticlassConfusionMatrix(n)

    @property
    def backbone(self) -> nn.Module:
        """Everything but the head; what Lightning's BackboneFinetuning callback freezes and thaws."""
        return backbone_modules(self.model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def on_fit_start(self) -> None:
        if self.device.type == "cuda":  # NHWC convolutions run on tensor cores; no gain on the CPU
            self.model.to(memory_format=torch.channels_last)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y = batch
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        logits = self(x)
        return self.loss(logits, y), logits, y

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        logits = self(x)
        # Outlier exposure (Hendrycks et al. 2019): images of no class (label -1, the data module's training
        # outliers) pushed towards a uniform prediction, so that a low confidence means "none of these".
        inlier = y >= 0
        loss = self.loss(logits[inlier], y[inlier]) if bool(inlier.any()) else logits.sum() * 0
        if not bool(inlier.all()):
            uniform = -logits[~inlier].float().log_softmax(1).mean(1).mean()  # cross-entropy to the uniform
            self.log("train/outlier_loss", uniform)
            loss = loss + self.outlier_weight * uniform
        logits, y = logits[inlier], y[inlier]
        self.train_acc(logits, y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        loss, logits, y = self._step(batch)
        self.val_acc(logits, y)
        self.log("val/loss", loss, sync_dist=True)
        self.log("val/acc", self.val_acc, prog_bar=True)

    def test_step(self, batch, batch_idx: int) -> None:
        loss, logits, y = self._step(batch)
        for metric in (self.test_acc, self.test_acc_per_class, self.test_confusion):
            metric.update(logits, y)
        self.log("test/loss", loss, sync_dist=True)
        self.log("test/acc", self.test_acc)

    def on_test_epoch_end(self) -> None:
        for name, acc in zip(self.class_names, self.test_acc_per_class.compute(), strict=True):
            self.log(f"test/acc_{name}", acc, sync_dist=False)  # already synced by torchmetrics
        self.test_acc_per_class.reset()
        # The confusion matrix stays computed for the run directory (see cli.py); reset at the next test.

    def on_test_epoch_start(self) -> None:
        self.test_confusion.reset()

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        x = batch[0] if isinstance(batch, list | tuple) else batch
        return self(x).softmax(dim=1)

    def configure_optimizers(self):
        # Only trainable parameters: BackboneFinetuning adds the frozen backbone as its own group later, and the
        # schedule (WarmupCosine by default) gives that group its own warm-up and decay.
        optimizer = self.optimizer(p for p in self.parameters() if p.requires_grad)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = self.scheduler(optimizer, **run_length_kwargs(self.scheduler, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["pretrained_info"] = self.pretrained_info.to_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "pretrained_info" in checkpoint:
            self.pretrained_info = PretrainedInfo(**checkpoint["pretrained_info"])
