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
from typing import Any

import torch
from torch import nn

from visionapp.ood import head

FORMS = ("eager", "aoti", "onnx", "onnx-int8")
ONNX_FILES = {"onnx": "model.onnx", "onnx-int8": "model.int8.onnx"}
OUTPUTS = ("logits", "features")


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
    """An ONNX form in an ONNX Runtime session on the CPU, with as many threads as torch uses here (the servers
    size torch's pool to the cores they were given): a normalised batch in, (logits, features) out."""

    def __init__(self, path: Path) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        # No spinning: ONNX Runtime's threads otherwise busy-wait after each run, taking the cores from what runs
        # next (the OOD score's torch ops, the next request's decoding). Measured with a knn bundle on 2 busy
        # cores: a lone answer 11.1 → 7.1 ms, the score's share 1.21 → 1.18 of the answer without it.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        names = [o.name for o in self.session.get_outputs()]
        if tuple(names) != OUTPUTS:
            raise ValueError(f"{path.name} has outputs {names}, expected {list(OUTPUTS)}: make export again")

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, features = self.session.run(None, {self.input: x.detach().cpu().contiguous().numpy()})
        return torch.from_numpy(logits), torch.from_numpy(features)


def fastest(records: dict[str, dict[str, Any]]) -> list[str]:
    """The forms that passed their checks, fastest first by their images/s at export, eager among them (timed
    beside them; last where it was not)."""
    passed = sorted((name for name, r in records.items() if r.get("passed") and name in FORMS),
                    key=lambda name: -float(records[name].get("images_per_s", 0)))  # fmt: skip
    return passed if "eager" in passed else [*passed, "eager"]
