"""The model's forms: one set of weights, run by the engine that is fastest where it serves (make export).

    eager      the state_dict in torchvision's module: what Captum explains, and what serves where no other fits (in
               the memory layout, NCHW or channels-last, that ran faster at export)
    aoti       torch.export + AOTInductor, a native package for one device, torch version and CPU instruction set
    onnx       the ONNX graph, run by ONNX Runtime: the format Triton, OpenVINO and KServe's runtimes take
    onnx-int8  the same quantized by ONNX Runtime (static, QDQ, per-channel weights, calibrated on the run's images)

Every form returns the logits and the penultimate features (`WithFeatures`), so that each out-of-distribution
method runs on it. model.json records each exported form with its checks and its speed (`forms`); `load_bundle`
runs the one asked for, or under "auto" the fastest that passed and loads here, falling back form by form with
the reason kept. ONNX Runtime is imported only when an ONNX form is loaded.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from visionapp.slim import OnnxSession


def head(model: nn.Module) -> nn.Linear:
    """The classifier's last Linear layer: its input is the penultimate feature vector."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no Linear layer to read penultimate features from")
    return linears[-1]


def logits_and_features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass of the eager model: the logits and the penultimate features (the head's input)."""
    captured: list[torch.Tensor] = []
    hook = head(model).register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0]))
    try:
        logits = model(x)
    finally:
        hook.remove()
    return logits, captured[0].flatten(1)


class WithFeatures(nn.Module):
    """The classifier as (logits, penultimate features), in one forward pass that export can trace: the body is
    the model with its last Linear layer replaced by Identity (a copy: the model itself is left as it is), the
    head is that layer. For torchvision's classifiers the head's input is exactly what the eager model feeds it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        linear = head(model)
        name = next(n for n, m in model.named_modules() if m is linear)
        self.body = copy.deepcopy(model)
        self.body.set_submodule(name, nn.Identity())
        self.head = linear

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(x).flatten(1)
        return self.head(features), features


class OnnxRunner:
    """An ONNX form on ONNX Runtime (`visionapp.slim.OnnxSession`) with as many threads as torch uses here (the
    servers size torch's pool to the cores they were given): a normalised batch in, (logits, features) out."""

    def __init__(self, path: Path) -> None:
        self.session = OnnxSession(path, threads=torch.get_num_threads())

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, features = self.session(x.detach().cpu().contiguous().numpy())
        return torch.from_numpy(logits), torch.from_numpy(features)
