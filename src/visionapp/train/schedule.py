"""The learning-rate schedule: linear warm-up then cosine decay, per optimizer step, for every parameter group,
including the groups a callback adds during training; and `ThawBackbone`, the fine-tuning callback that adds one.

Picked in YAML through LightningCLI's scheduler injection (`model.scheduler`), like the optimizer:

    model:
      scheduler:
        class_path: visionapp.train.schedule.WarmupCosine
        init_args: {warmup_fraction: 0.05}

A scheduler with a `total_steps` parameter left unset (this one, torch's OneCycleLR) is given the run's number
of optimizer steps by the LightningModule.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch.callbacks import BackboneFinetuning
from lightning.pytorch.utilities import rank_zero_warn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


class WarmupCosine(LRScheduler):
    """Each parameter group warms up linearly over `warmup_fraction` of the run, then decays to zero by a cosine
    that ends at the run's last step.

    A group added mid-run (e.g. a backbone thawed at epoch 1) is adopted before the first optimizer step it
    takes part in: its own warm-up starts at the step it joined, from the LR it was added with (its peak), and
    its cosine ends at the same last step. torch's LambdaLR and CosineAnnealingLR cannot do this: they hold one
    base LR per group known at construction, and fail when a group is added. The schedule owns every group's
    LR: values written by a callback between steps (BackboneFinetuning's per-epoch `lambda_func`) are replaced
    by the schedule's before each step. Where a group starts is kept in the group itself (`schedule_start`), so
    it is saved with the optimizer's state and a resumed run continues with the same LRs.
    """

    def __init__(
        self, optimizer: Optimizer, total_steps: int | None = None, warmup_fraction: float = 0.05, last_epoch: int = -1
    ) -> None:
        if total_steps is None or total_steps < 1:
            raise ValueError(f"WarmupCosine needs total_steps >= 1 (the run's optimizer steps), got {total_steps}")
        if not 0 <= warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {warmup_fraction}")
        self.total_steps, self.warmup_fraction = total_steps, warmup_fraction
        self.warmup_steps = max(1, int(warmup_fraction * total_steps))
        super().__init__(optimizer, last_epoch)
        # Before every optimizer step: adopt new groups and (re)apply the schedule, so the step uses it.
        self._hook = optimizer.register_step_pre_hook(lambda opt, args, kwargs: self.apply())

    def factor(self, step: int, start: int) -> float:
        """LR multiplier at `step` for a group that joined at `start`."""
        t = step - start
        if t < self.warmup_steps:
            return (t + 1) / self.warmup_steps
        decay = max(1, self.total_steps - start - self.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (t - self.warmup_steps) / decay)))

    def get_lr(self) -> list[float | torch.Tensor]:
        step = max(self.last_epoch, 0)
        lrs: list[float | torch.Tensor] = []
        for group in self.optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])  # the LR it was added with is its peak
            start = group.setdefault("schedule_start", step)
            lrs.append(group["initial_lr"] * self.factor(step, start))
        self.base_lrs = [g["initial_lr"] for g in self.optimizer.param_groups]
        return lrs

    def apply(self) -> None:
        """Set every group's LR for the current step, adopting groups added since the last step."""
        for group, lr in zip(self.optimizer.param_groups, self.get_lr(), strict=True):
            group["lr"] = lr
        self._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in super().state_dict().items() if k != "_hook"}  # a hook handle is not state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A resumed run continues where its schedule was. Resumed with another length (`--trainer.max_epochs`
        changed), the cosine is stretched to the new last step and the log says so: the checkpoint's own length
        would leave every step past its end at LR 0, a run that trains nothing."""
        total = self.total_steps
        super().load_state_dict(state_dict)
        if self.total_steps != total:
            rank_zero_warn(
                f"resumed with {total} optimizer steps in all where the checkpoint's run planned "
                f"{self.total_steps}: the learning-rate schedule is stretched to end at step {total} (a fresh "
                "fine-tune from the checkpoint's weights is the other way: --model.weights or a new run)"
            )
            self.total_steps = total
            self.apply()  # the groups' LRs for the step it resumes at, before that step logs them


class ThawBackbone(BackboneFinetuning):
    """Lightning's BackboneFinetuning, with the thawed backbone's LR left to the schedule.

    At `unfreeze_backbone_at_epoch` the backbone is unfrozen and added as a parameter group whose peak LR is
    `backbone_initial_lr`, or `backbone_initial_ratio_lr` x the head's LR at that moment; the scheduler gives it
    its own warm-up and decay from there (and a resumed run gets it back from the checkpoint). BackboneFinetuning
    itself would also rescale the backbone's LR at every later epoch start (`lambda_func`), which a per-step
    schedule overrides at once: this callback leaves that out, so the LR logged is the LR used.
    """

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """On a resume past the thaw, the backbone trains again as it did before the interruption. Lightning's
        BaseFinetuning freezes it in `setup` whatever the epoch and restores only the optimizer's groups, and
        BackboneFinetuning thaws it only *at* its epoch, so a resumed run would train its head alone from then on."""
        restarting = self._restarting
        super().on_fit_start(trainer, pl_module)
        if restarting and any(self._thawed(pl_module, opt) for opt in trainer.optimizers):
            self.make_trainable(pl_module.backbone)  # requires_grad and BatchNorm's train mode, as at the thaw

    def freeze_before_training(self, pl_module: Any) -> None:
        # with the config's train_bn: Lightning's BackboneFinetuning leaves it out here, and BatchNorm trains from
        # the first step whatever train_bn says
        self.freeze(pl_module.backbone, train_bn=self.train_bn)

    def _thawed(self, pl_module: Any, optimizer: Optimizer) -> bool:
        """Whether the parameters the thaw adds (the backbone's; its BatchNorm's too with train_bn) are in the
        optimizer's groups already (restored from a checkpoint taken after the thaw); before the thaw they are in
        none."""
        ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
        added = [p for m in self.flatten_modules(pl_module.backbone)
                 if self.train_bn or not isinstance(m, _BatchNorm) for p in m.parameters(recurse=False)]  # fmt: skip
        return bool(added) and all(id(p) in ids for p in added)

    def finetune_function(self, pl_module: Any, epoch: int, optimizer: Optimizer) -> None:
        if epoch != self.unfreeze_backbone_at_epoch or self._thawed(pl_module, optimizer):
            return  # not the thaw's epoch, or resumed within it, after it (the group is back already)
        super().finetune_function(pl_module, epoch, optimizer)
        for config in pl_module.trainer.lr_scheduler_configs:
            if isinstance(config.scheduler, WarmupCosine):
                config.scheduler.apply()  # the new group starts its warm-up now, before any step or LR log


def run_length_kwargs(factory: Callable[..., LRScheduler], total_steps: int) -> dict[str, int]:
    """{"total_steps": total_steps} when the scheduler `factory` has a `total_steps` parameter left unset.

    LightningCLI hands a scheduler from YAML over as functools.partial(..., cls, **init_args), all init_args
    filled in; in Python it may be the class itself.
    """
    if isinstance(factory, functools.partial):
        given = factory.keywords
    else:
        given = {k: p.default for k, p in inspect.signature(factory).parameters.items()}
    return {"total_steps": total_steps} if "total_steps" in given and given["total_steps"] is None else {}
