"""The bundle: the contract every stage after training reads (docs/architecture.md).

    bundle/model.pt    the plain nn.Module's state_dict (torch.load(..., weights_only=True))
    bundle/model.json  arch, class names, input size, mean/std, pretrained origin, metrics, versions
    bundle/model.<device>.pt2, model.onnx, model.int8.onnx   optional, from make export: the model's faster forms
                       (visionapp.forms), each recorded in model.json's `forms` with its checks and speed

From the first two files alone, with torch and torchvision, `load_bundle` rebuilds the model and its exact
eval preprocessing. explain/ and serve/ use nothing else from training.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torch import nn
from torchvision.models import get_model

from visionapp.errors import UserError
from visionapp.forms import OnnxRunner, logits_and_features
from visionapp.imagefiles import find_images, is_image_file
from visionapp.manifest import (
    FORMS,
    TEST_FILES,
    WEIGHTS_FILE,
    bundle_file,
    fastest,
    form_file_problem,
    read_meta,
    write_meta,
)
from visionapp.ood import FEATURES_FILE, OODRecord, calibrated_answer, served_record
from visionapp.transforms import EvalPreset


def compiled_file(device: str) -> str:
    """The AOTInductor form's file for `device`."""
    return f"model.{device}.pt2"


def cpu_isa() -> str:
    """The vector instruction set AOTInductor compiles CPU kernels for on this machine (e.g. avx512, avx2)."""
    from torch._inductor import cpu_vec_isa

    return str(cpu_vec_isa.pick_vec_isa())


Runner = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # a normalised batch -> (logits, features)


@dataclass
class Bundle:
    model: nn.Module  # in eval mode: the eager model (Captum explains it)
    transform: EvalPreset
    meta: dict[str, Any]
    # the exported form that answers (visionapp.forms): a normalised batch in, (logits, features) out; None: eager
    runner: Runner | None = None
    form: str = "eager"  # which form runs
    form_note: str = "eager: not asked for"  # which form runs, and why
    ood_bank: np.ndarray | None = None  # knn's training features (normalised, float32), when the OOD method is knn
    channels_last: bool = False  # the eager model in NHWC (where make export found it faster), its inputs converted

    def run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward pass of a normalised batch: raw logits and penultimate features, from the loaded form."""
        if self.runner is None:
            return logits_and_features(self.model, self._layout(x))
        return self.runner(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw logits of a normalised batch, from the loaded form."""
        return self.model(self._layout(x)) if self.runner is None else self.runner(x)[0]

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    @property
    def temperature(self) -> float:
        """Divides the logits before the softmax: fitted on the validation split after training (1.0: none)."""
        return float(self.meta.get("temperature", 1.0))

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """Calibrated class probabilities (N, classes) of a normalised batch; `model(x)` stays the raw logits."""
        return (self.forward(x) / self.temperature).softmax(dim=1)

    @property
    def ood(self) -> OODRecord | None:
        """The out-of-distribution method and threshold fitted after fit (None for a run from before them), with
        the loaded form's own threshold where export refitted one (int8)."""
        return served_record(self.meta, self.form_record)

    @property
    def form_record(self) -> dict[str, Any]:
        """model.json's record of the loaded form ({} for eager)."""
        if self.form == "eager":
            return {}
        return dict(self.meta["forms"][self.device][self.form])

    @property
    def device(self) -> str:
        return next(self.model.parameters()).device.type

    def answer(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """One forward pass of a normalised batch, on the loaded form: calibrated probabilities, and the
        out-of-distribution scores and flags (None without an OOD record), on the CPU: `visionapp.ood`'s
        `calibrated_answer`, as the slim predictor answers."""
        record = self.ood
        if record is None:
            return self.probabilities(x).cpu(), None, None
        logits, features = self.run(x) if record.method == "knn" else (self.forward(x), None)
        features_np = None if features is None else features.detach().float().cpu().numpy()
        probabilities, scores, flags = calibrated_answer(
            logits.detach().float().cpu().numpy(), features_np, record, self.ood_bank, self.temperature
        )
        return torch.from_numpy(probabilities), torch.from_numpy(scores), torch.from_numpy(flags)


def versions(packages: tuple[str, ...] = ("lightning",)) -> dict[str, str]:
    """Python's, torch's, torchvision's and `packages`' versions (read from the installed metadata, so nothing is
    imported): what a bundle was made with, what a benchmark ran on."""
    out = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__}
    for package in packages:
        with suppress(PackageNotFoundError):
            out[package] = version(package)
    return out


def run_test_images(run_dir: str | Path) -> list[Path]:
    """The test images of a run that are still on disk: those its test_files.txt lists (folder data, in the split's
    order), else the images under the test/ folder of the data root its metrics.json names; [] for neither (a
    torchvision set)."""
    run_dir = Path(run_dir)
    listed = run_dir / TEST_FILES
    if listed.is_file():
        return [f for f in map(Path, listed.read_text().splitlines()) if f.name and f.is_file()]
    metrics = run_dir / "metrics.json"
    root = json.loads(metrics.read_text()).get("data_root") if metrics.is_file() else None
    return find_images(Path(root) / "test") if root and (Path(root) / "test").is_dir() else []


def _data_root(run_dir: Path, key: str = "data_root") -> Path | None:
    metrics = run_dir / "metrics.json"
    root = json.loads(metrics.read_text()).get(key) if metrics.is_file() else None
    return Path(root) if root else None


def run_split_images(run_dir: str | Path, split: str, n: int) -> list[Path]:
    """Up to n images of the run's `split` (a seeded sample): its data root's `split`/ folder, or where the data has
    no such folder (a folder split at random), the data's images outside the test split."""
    run_dir = Path(run_dir)
    root = _data_root(run_dir)
    if root is None or not root.is_dir():
        return []
    if (root / split).is_dir():
        files = find_images(root / split)
    else:
        test = set(run_test_images(run_dir))
        files = [f for f in find_images(root) if f not in test]
    if len(files) > n:
        files = [files[i] for i in torch.randperm(len(files), generator=torch.Generator().manual_seed(0))[:n]]
    return files


def run_ood_images(run_dir: str | Path) -> dict[str, list[Path]]:
    """The run's out-of-distribution sets (its data's `ood_root`, else `ood/` under its data root), by the rule
    training measured them by: each folder a set, or the whole folder one set `ood` when it holds images itself."""
    run_dir = Path(run_dir)
    root = _data_root(run_dir, "ood_root") or ((_data_root(run_dir) or run_dir / "none") / "ood")
    if not root.is_dir():
        return {}
    if any(f.is_file() and is_image_file(f) for f in root.iterdir()):
        return {"ood": find_images(root)}
    folders = [d for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")]
    return {d.name: files for d in folders if (files := find_images(d))}


def save_bundle(
    directory: str | Path,
    model: nn.Module,
    *,
    arch: str,
    class_names: list[str],
    image_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    pretrained: dict[str, Any],
    metrics: dict[str, Any],
    temperature: float = 1.0,
    ood: dict[str, Any] | None = None,
    ood_bank: np.ndarray | None = None,
) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # Contiguous NCHW copies: loadable anywhere, whatever memory format training used.
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    torch.save(state, directory / WEIGHTS_FILE)
    meta = {
        "arch": arch,
        "num_classes": len(class_names),
        "class_names": list(class_names),
        "image_size": image_size,
        "mean": list(mean),
        "std": list(std),
        "pretrained": pretrained,
        "metrics": metrics,
        "temperature": temperature,
        "versions": versions(),
    }
    if ood:
        meta["ood"] = ood  # the out-of-distribution method and threshold (visionapp.ood)
    if ood_bank is not None:  # knn's training features, float16
        np.save(directory / FEATURES_FILE, np.asarray(ood_bank, np.float16))
    if arch.startswith("vit_"):
        meta["model_kwargs"] = {"image_size": image_size}
    write_meta(directory, meta)
    return directory


def load_bundle(directory: str | Path, map_location: str | torch.device = "cpu", runtime: str = "eager") -> Bundle:
    """The bundle's model, preprocessing and metadata, answering with the form `runtime` names (visionapp.forms):
    "eager"; an exported form ("aoti", "onnx", "onnx-int8"), or ValueError saying why it cannot run here; or "auto":
    the fastest form that passed its checks at export and loads here, falling back form by form to eager.
    `form_note` says which form answers and why."""
    directory = Path(directory)
    meta = read_meta(directory)
    if runtime not in (*FORMS, "auto"):
        raise UserError(f"runtime {runtime!r} is not a form; choose from auto, {', '.join(FORMS)}")
    model = get_model(meta["arch"], weights=None, num_classes=meta["num_classes"], **meta.get("model_kwargs", {}))
    model.load_state_dict(torch.load(directory / WEIGHTS_FILE, map_location=map_location, weights_only=True))
    transform = EvalPreset(image_size=meta["image_size"], mean=meta["mean"], std=meta["std"])
    bundle = Bundle(model.eval(), transform, meta)
    record = bundle.ood
    if record is not None and record.features:
        bundle.ood_bank = load_bank(bundle_file(directory, record.features))
    if runtime != "eager":
        device = torch.device(map_location).type
        _load_form(bundle, directory, device, runtime)
        if bundle.form == "eager" and meta.get("forms", {}).get(device, {}).get("eager", {}).get("channels_last"):
            bundle.model.to(memory_format=torch.channels_last)  # faster at export, as make export timed it
            bundle.channels_last = True
            bundle.form_note += " (channels-last)"
    return bundle


def _load_form(bundle: Bundle, directory: Path, device: str, runtime: str) -> None:
    """Load the form asked for, or under "auto" the fastest that loads; the reasons for each passed over."""
    records = bundle.meta.get("forms", {}).get(device, {})
    reasons = []
    if runtime == "auto" and not records:
        old = " (its compiled model predates the forms: make export again)" if "compiled" in bundle.meta else ""
        reasons.append(f"the bundle has no exported forms for {device}{old}: make export")
    for name in fastest(records) if runtime == "auto" else [runtime]:
        if name == "eager":
            break
        reason = _unfit(directory, records.get(name), name, device)
        if reason is None:
            try:
                bundle.runner = form_runner(bundle_file(directory, records[name]["file"]), name, records[name])
                bundle.form = name
                why = "the fastest form that passed its checks here" if runtime == "auto" else "asked for"
                bundle.form_note = f"{name}: {records[name]['file']}, {why}"
                if reasons:
                    bundle.form_note += f" ({'; '.join(reasons)})"
                return
            except Exception as e:  # a form this machine cannot load after all (no onnxruntime, another CPU)
                reason = f"loading {records[name]['file']} failed: {type(e).__name__}: {e}"
        if runtime != "auto":
            raise ValueError(f"{directory}: cannot run the {name} form: {reason}")
        reasons.append(f"{name}: {reason}")
    bundle.form_note = f"eager: {'; '.join(reasons) or 'the fastest form here'}"


def load_bank(path: Path) -> np.ndarray:
    """knn's feature bank as float32: a .npy file, or the .pt file runs from before it wrote (torch.load)."""
    if path.suffix == ".pt":
        return torch.load(path, map_location="cpu", weights_only=True).float().numpy()
    return np.load(path, allow_pickle=False).astype(np.float32)


def form_runner(path: Path, name: str, record: dict[str, Any]) -> Runner:
    """The exported form in `path` as a Runner (ONNX Runtime's session, or AOTInductor's package)."""
    if name != "aoti":
        return OnnxRunner(path)
    from torch._inductor import aoti_load_package

    package = aoti_load_package(str(path))
    largest, channels_last = record["batch"][1], record.get("channels_last", False)

    def run(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if channels_last:  # exported for NHWC inputs
            x = x.contiguous(memory_format=torch.channels_last)
        outs = [package(chunk) for chunk in x.split(largest)]  # in chunks of the batch sizes it was exported for
        return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])

    return run


def _unfit(directory: Path, record: dict[str, Any] | None, name: str, device: str) -> str | None:
    """Why the exported form cannot run here (None: it can). Each form is loaded only if it passed its checks at
    export and its file is the one checked (its SHA-256): AOTInductor's is native code. AOTInductor's output is
    also tied to its torch version, its device and, on the CPU, the instruction set it was compiled for; the ONNX
    forms run on ONNX Runtime's CPU provider."""
    problem = form_file_problem(directory, record, name, device)
    if problem is not None or record is None:
        return problem
    if name != "aoti":
        return None if device == "cpu" else f"the ONNX forms run on the CPU here, not on {device}"
    if record["torch"] != torch.__version__:
        return f"compiled with torch {record['torch']}, this is torch {torch.__version__}: export again"
    if device == "cpu":
        missing = [isa for isa in (record.get("cpu_isa") or "").split() if not _cpu_has(isa)]
        if missing:
            return f"compiled for {record['cpu_isa']} instructions, this CPU lacks {' '.join(missing)}"
    return None


# Instruction sets AOTInductor compiles CPU kernels for, and how torch tells whether this CPU has them (from
# cpuinfo: no compiler needed, unlike torch._inductor's own check, so it works in a slim serving image).
_CPU_CHECKS = {
    "avx2": "_is_avx2_supported", "avx512": "_is_avx512_supported", "avx512_vnni": "_is_vnni_supported",
    "amx_tile": "_is_amx_tile_supported", "avx512_bf16": "_is_avx512_bf16_supported",
}  # fmt: skip


def _cpu_has(isa: str) -> bool:
    check = getattr(torch.cpu, _CPU_CHECKS.get(isa, ""), None)
    return bool(check()) if check is not None else False  # an instruction set we cannot check: assume not
