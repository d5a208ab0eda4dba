"""Export the bundle's model into its faster forms, each checked before it is kept (`make export`).

    python -m visionapp.deploy.export --bundle runs/latest/bundle [--forms aoti onnx onnx-int8] [--device cpu|cuda]

Every form returns the logits and the penultimate features (visionapp.forms.WithFeatures), so every
out-of-distribution method runs on it:
  aoti       torch.export with a dynamic batch (1 .. --max-batch) + AOTInductor: bundle/model.<device>.pt2
  onnx       torch.onnx.export (the dynamo exporter, dynamic batch): bundle/model.onnx, run by ONNX Runtime
  onnx-int8  ONNX Runtime's static quantization of it (QDQ, per-channel int8 weights, activations calibrated on
             --calibration images of the run's validation split): bundle/model.int8.onnx (CPU only)
Checks, on the run's real images (random inputs where the run has none): the fp32 forms' logits and features
within --tolerance (1e-4) of the eager model's; int8, on the run's whole test split against the eager model: top-1
agreement >= 99%, accuracy within 0.5 points and, with an OOD record, AUROC on each of the run's OOD sets within
0.01 (its own threshold refitted on the validation images it was calibrated on). Then each passed form and the
eager model are timed at --max-batch; model.json's `forms` records each form's file, SHA-256 (any other file is
never loaded), checks, figures and images/s, and the servers, predict-folder and the demo run the fastest that
passed (`load_bundle(..., runtime="auto")`). A form that fails is recorded with the reason and printed; a form
that passed before and fails now keeps its earlier file and record.

AOTInductor's levers (measured by python -m visionapp.bench.compiled): freezing (on: BatchNorm folds into the
convolutions, oneDNN prepacks the weights), channels-last (on), --max-autotune (off: its gain varied 1.16-1.9x).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from visionapp.bundle import (
    Bundle,
    Runner,
    compiled_file,
    cpu_isa,
    form_runner,
    load_bundle,
    run_ood_images,
    run_split_images,
    run_test_images,
)
from visionapp.errors import UserError, run_main
from visionapp.forms import WithFeatures, logits_and_features
from visionapp.manifest import META_FILE, ONNX_FILES, OUTPUTS, fastest, file_sha256, write_meta
from visionapp.ood import FEATURES_FILE, auroc, fit_threshold, method_scores

TOLERANCE = 1e-4
INT8_CHECKS = {"agreement": 0.99, "accuracy_points": 0.5, "auroc": 0.01}  # int8's checks against the eager model
CHECK_IMAGES = 1000  # at most this many of the test split, and 300 of each OOD set, for int8's checks


@dataclass
class Images:
    """The run's images, preprocessed as served: a parity batch, and for int8 the test split with its labels, the
    validation images it is calibrated on, and each OOD set."""

    batch: torch.Tensor
    test: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    val: torch.Tensor | None = None
    ood: dict[str, torch.Tensor] | None = None
    limits: dict[str, float] = field(default_factory=lambda: dict(INT8_CHECKS))  # int8's check


def stacked(bundle: Bundle, files: list[Path]) -> torch.Tensor:
    return torch.stack([bundle.transform.load(f) for f in files])


def run_images(bundle: Bundle, bundle_dir: Path, n: int, calibration: int, int8: bool) -> Images:
    run = bundle_dir.parent
    files = run_test_images(run)
    if not files:
        print(f"  no test images for the run {run}: checking on random inputs", flush=True)
        size = bundle.meta["image_size"]
        return Images(torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0)))
    images = Images(stacked(bundle, files[:n]))
    if int8:
        files = files[:CHECK_IMAGES]
        index = {name: i for i, name in enumerate(bundle.class_names)}
        files = [f for f in files if f.parent.name in index]
        images.test, images.labels = stacked(bundle, files), torch.tensor([index[f.parent.name] for f in files])
        val = run_split_images(run, "val", calibration)
        images.val = stacked(bundle, val) if val else None
        images.ood = {name: stacked(bundle, fs[:300]) for name, fs in run_ood_images(run).items() if fs}
        print(f"  int8: calibrated on {len(val)} validation images, checked on {len(files)} test images and "
              f"{', '.join(f'{len(v)} {k}' for k, v in images.ood.items()) or 'no OOD set'}", flush=True)  # fmt: skip
    return images


def export_bundle(
    bundle_dir: str | Path,
    *,
    device: str = "cpu",
    forms: tuple[str, ...] = ("aoti", "onnx", "onnx-int8"),
    max_batch: int = 8,
    freezing: bool = True,
    max_autotune: bool = False,
    channels_last: bool = True,
    tolerance: float = TOLERANCE,
    calibration: int = 300,
    keep_failed: bool = False,
    int8_checks: dict[str, float] | None = None,
) -> dict[str, dict[str, Any]]:
    """Export, check, time and record each of `forms`; model.json's records for `device` (each with "passed").
    keep_failed: a form that fails its check is kept (never loaded: its record says it failed), e.g. for the bench to
    time it. int8_checks: other limits for int8's check than INT8_CHECKS (recorded with it)."""
    bundle_dir = Path(bundle_dir)
    bundle = load_bundle(bundle_dir, map_location=device)
    if device != "cpu" and (onnx := [f for f in forms if f.startswith("onnx")]):
        print(f"  {', '.join(onnx)}: exported on the CPU only (ONNX Runtime's CPU provider); skipped", flush=True)
        forms = tuple(f for f in forms if not f.startswith("onnx"))
    if "onnx-int8" in forms and "onnx" not in forms:
        raise UserError("onnx-int8 is quantized from the onnx form: export both (--forms onnx onnx-int8)")
    images = run_images(bundle, bundle_dir, max_batch, calibration, "onnx-int8" in forms)
    images.limits = {**INT8_CHECKS, **(int8_checks or {})}
    wrapped = WithFeatures(bundle.model).to(device).eval()
    meta = json.loads((bundle_dir / META_FILE).read_text())
    records: dict[str, dict[str, Any]] = dict(meta.get("forms", {}).get(device, {}))
    aoti = {"freezing": freezing, "max_autotune": max_autotune, "channels_last": channels_last}
    for name in forms:
        record = export_form(name, bundle, bundle_dir, wrapped, device, max_batch, aoti, images, tolerance, keep_failed)
        earlier = records.get(name, {}).get("passed") and not keep_failed
        if record["passed"]:
            print(f"  passed: {summary(record)}", flush=True)
        else:
            kept = "kept for timing, never loaded" if keep_failed else "left out"
            print(f"  FAILED its check, {'its earlier file and record are kept' if earlier else kept}: "
                  f"{record['reason']}", flush=True)  # fmt: skip
        if record["passed"] or not earlier:
            records[name] = record
    time_forms(bundle_dir, bundle, device, records, images.batch, keep_failed)
    meta.pop("compiled", None)  # the AOTInductor record from before the forms (logits only) is replaced
    meta.setdefault("forms", {})[device] = records
    if bundle.ood_bank is not None and meta["ood"].get("features", "").endswith(".pt"):
        # A run from before the .npy bank: the slim predictor (no torch) reads knn's features as .npy only.
        np.save(bundle_dir / FEATURES_FILE, bundle.ood_bank.astype(np.float16))
        meta["ood"]["features"] = FEATURES_FILE
    write_meta(bundle_dir, meta)
    print(f"default form on {device}: {fastest(records)[0]} (the fastest that passed); recorded in "
          f"{bundle_dir / META_FILE}", flush=True)  # fmt: skip
    return records


def export_form(
    name: str, bundle: Bundle, bundle_dir: Path, wrapped: torch.nn.Module, device: str, max_batch: int,
    aoti: dict[str, bool], images: Images, tolerance: float, keep_failed: bool,
) -> dict[str, Any]:  # fmt: skip
    """One form exported under a temporary name and checked; renamed over the form's file only once it passed (or
    keep_failed): a refused or interrupted export leaves the earlier file as it was. Its record."""
    final = bundle_dir / (compiled_file(device) if name == "aoti" else ONNX_FILES[name])
    candidate = final.with_name(f".{final.stem}.tmp-{os.getpid()}{final.suffix}")  # AOTInductor wants .pt2
    if name == "onnx-int8" and (images.val is None or not len(images.val)):
        return {"file": final.name, "passed": False, "reason": "no validation images of the run to calibrate on"}
    try:
        print(f"{name}: exporting {bundle.meta['arch']} at {bundle.meta['image_size']} px", flush=True)
        t0 = time.perf_counter()
        if name == "aoti":
            compile_package(wrapped, bundle.meta, candidate, device, max_batch, aoti)
        elif name == "onnx":
            export_onnx(wrapped, bundle.meta, candidate)
        else:
            quantize(bundle_dir / ONNX_FILES["onnx"], candidate, images)
        record = {"file": final.name, "seconds": round(time.perf_counter() - t0, 1), "outputs": list(OUTPUTS),
                  **form_facts(name, device, max_batch, bundle, aoti)}  # fmt: skip
        record.update(check(bundle, wrapped, form_runner(candidate, name, record), name, images, tolerance))
        if record["passed"] or keep_failed:
            record["sha256"] = file_sha256(candidate)  # of the file checked: any other is refused at load
            os.replace(candidate, final)
        return record
    finally:
        candidate.unlink(missing_ok=True)


def form_facts(name: str, device: str, max_batch: int, bundle: Bundle, aoti: dict[str, bool]) -> dict[str, Any]:
    """What a form is tied to, recorded beside it."""
    if name != "aoti":
        import onnxruntime

        return {"device": "cpu", "onnxruntime": onnxruntime.__version__, "image_size": bundle.meta["image_size"]}
    options = {k: aoti[k] for k in ("freezing", "max_autotune")}
    return {"device": device, "torch": torch.__version__, "cpu_isa": cpu_isa() if device == "cpu" else None,
            "batch": [1, max_batch], "image_size": bundle.meta["image_size"],
            "channels_last": aoti["channels_last"], "options": options}  # fmt: skip


def summary(record: dict[str, Any]) -> str:
    if "agreement" in record:
        aurocs = "".join(f", AUROC {k} {v:.3f} (eager {record['eager_auroc'][k]:.3f})"
                         for k, v in record.get("auroc", {}).items())  # fmt: skip
        return (f"top-1 agreement {record['agreement']:.2%}, accuracy {record['accuracy']:.2%} (eager "
                f"{record['eager_accuracy']:.2%}){aurocs}")  # fmt: skip
    return f"max |form - eager| = {record['max_abs_diff']:.2g} on {record['checked_images']} images"


def check(bundle: Bundle, eager: torch.nn.Module, form: Runner, name: str, images: Images, tol: float) -> dict:
    """The form's check: fp32 forms equal the eager model within `tol`; int8 agrees with it on the test split."""
    if name != "onnx-int8":
        x = images.batch.to(next(eager.parameters()).device)
        with torch.inference_mode():
            diff = max(
                (a.cpu() - b.cpu()).abs().max().item()
                for xs in (x, x[:1])
                for a, b in zip(form(xs), eager(xs), strict=True)
            )
        ok = diff <= tol
        return {"passed": ok, "max_abs_diff": diff, "checked_images": len(x),
                **({} if ok else {"reason": f"logits or features differ from the eager model's by {diff:.3g} "
                                            f"(tolerance {tol:g})"})}  # fmt: skip
    return check_int8(bundle, eager, form, images)


def check_int8(bundle: Bundle, eager: torch.nn.Module, form: Runner, images: Images) -> dict:
    if images.test is None or images.labels is None or not len(images.test):
        return {"passed": False, "reason": "no test images of the run to check the int8 model's answers on"}
    out: dict[str, Any] = {}
    inputs = {"test": images.test, "val": images.val, **(images.ood or {})}
    passes = {n: {"eager": batched(eager, x), "form": batched(form, x)} for n, x in inputs.items() if x is not None}
    top = {k: passes["test"][k][0].argmax(1) for k in ("eager", "form")}
    out["agreement"] = float((top["eager"] == top["form"]).float().mean())
    out["eager_accuracy"] = float((top["eager"] == images.labels).float().mean())
    out["accuracy"] = float((top["form"] == images.labels).float().mean())
    out["checked_images"], limits = len(images.test), images.limits
    out["limits"] = limits
    reasons = []
    if out["agreement"] < limits["agreement"]:
        reasons.append(f"top-1 agreement {out['agreement']:.2%} < {limits['agreement']:.0%}")
    if abs(out["accuracy"] - out["eager_accuracy"]) * 100 > limits["accuracy_points"]:
        reasons.append(f"accuracy {out['accuracy']:.2%} vs eager {out['eager_accuracy']:.2%}")
    record = bundle.ood
    if record is not None:
        score = lambda p: method_scores(record.method, p[0].numpy(), p[1].numpy(), bundle.ood_bank,  # noqa: E731
                                        record.k or 1, bundle.temperature)  # fmt: skip
        sets = [n for n in passes if n not in ("test", "val")]
        for key, which in (("eager_auroc", "eager"), ("auroc", "form")):
            inside = score(passes["test"][which])  # the test split scored once, against each set
            out[key] = {n: round(auroc(inside, score(passes[n][which])), 4) for n in sets}
        reasons += [f"AUROC {n} {out['auroc'][n]:.3f} vs eager {out['eager_auroc'][n]:.3f}" for n in sets
                    if abs(out["auroc"][n] - out["eager_auroc"][n]) > limits["auroc"]]  # fmt: skip
        if "val" in passes:  # the flag's threshold on the form's own scores, at the run's acceptance
            out["ood_threshold"] = round(fit_threshold(score(passes["val"]["form"]), record.accept), 6)
        else:
            reasons.append("no validation images to refit the OOD threshold on")
    out["passed"] = not reasons
    if reasons:
        out["reason"] = "; ".join(reasons)
    return out


def batched(fn: Runner | torch.nn.Module, x: torch.Tensor, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    device = next(fn.parameters()).device if isinstance(fn, torch.nn.Module) else torch.device("cpu")
    with torch.inference_mode():
        outs = [fn(chunk.to(device)) for chunk in x.split(size)]
    return torch.cat([o[0].float().cpu() for o in outs]), torch.cat([o[1].float().cpu() for o in outs])


def time_forms(
    bundle_dir: Path, bundle: Bundle, device: str, records: dict[str, dict], x: torch.Tensor, failed: bool = False
) -> None:
    """Images/s of each passed form and the eager model (NCHW and channels-last) at the batch given, alternated over
    three rounds (medians): what `runtime="auto"` chooses by, eager among the forms, in the faster of its layouts.
    Timed in this process, on this machine: the same for every form."""
    last = copy.deepcopy(bundle.model).to(memory_format=torch.channels_last)
    runners: dict[str, Runner] = {
        "eager": bundle.run,
        "eager_channels_last": lambda b: logits_and_features(last, b.contiguous(memory_format=torch.channels_last)),
    }
    for name, record in records.items():
        if record.get("passed") or (failed and (bundle_dir / record.get("file", "")).is_file()):
            runners[name] = form_runner(bundle_dir / record["file"], name, record)
    x = x.to(device)
    seconds: dict[str, list[float]] = {name: [] for name in runners}
    with torch.inference_mode():
        for _ in range(3):
            for name, run in runners.items():
                run(x)  # warm
                start = time.perf_counter()
                for _ in range(5):
                    run(x)
                seconds[name].append((time.perf_counter() - start) / 5)
    speed = {name: round(len(x) / statistics.median(s), 1) for name, s in seconds.items()}
    nchw, channels_last = speed.pop("eager"), speed.pop("eager_channels_last")
    records["eager"] = {"passed": True, "channels_last": channels_last > nchw, "images_per_s": max(nchw, channels_last),
                        "nchw_images_per_s": nchw, "channels_last_images_per_s": channels_last}  # fmt: skip
    for name, ips in speed.items():
        records[name]["images_per_s"] = ips
        records[name]["vs_eager"] = round(ips / records["eager"]["images_per_s"], 2)
    speed = {"eager": nchw, "eager channels-last": channels_last, **speed}
    print("  images/s at batch " + str(len(x)) + ": " + ", ".join(f"{n} {v:g}" for n, v in speed.items()), flush=True)


def export_onnx(model: torch.nn.Module, meta: dict[str, Any], path: Path) -> None:
    """torch.onnx.export's dynamo exporter (opset 18+), a dynamic batch; the weights inside the one file."""
    size = meta["image_size"]
    example = torch.randn(2, 3, size, size)
    program = torch.onnx.export(
        model.cpu(), (example,), dynamo=True, input_names=["input"], output_names=list(OUTPUTS),
        dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},), verbose=False,
    )  # fmt: skip
    assert program is not None  # the dynamo exporter returns the program
    program.save(str(path), external_data=False)


def quantize(fp32: Path, path: Path, images: Images) -> None:
    """ONNX Runtime's static quantization: QDQ nodes, int8 per-channel weights, uint8 activations whose ranges
    are calibrated on the validation images (min-max), after its pre-processing (shape inference, fusions)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    assert images.val is not None  # export_form checked
    batches = iter([{"input": b.numpy()} for b in images.val.split(16)])

    class Reader(CalibrationDataReader):
        def get_next(self) -> dict | None:
            return next(batches, None)

    prepared = path.with_name(f"{path.stem}.pre.onnx")
    try:
        quant_pre_process(str(fp32), str(prepared))
        quantize_static(str(prepared), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)  # fmt: skip
    finally:
        prepared.unlink(missing_ok=True)


def compile_package(
    model: torch.nn.Module, meta: dict[str, Any], path: Path, device: str, max_batch: int, aoti: dict[str, bool]
) -> None:
    """torch.export with a dynamic batch of 1..max_batch, then AOTInductor into the package at `path`."""
    size = meta["image_size"]
    memory_format = torch.channels_last if aoti["channels_last"] else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    # An example batch of 2: a batch of 1 would be specialised to the constant 1 (0/1 specialisation).
    example = torch.randn(2, 3, size, size, device=device).contiguous(memory_format=memory_format)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    with torch.no_grad():
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    print(f"  exported; compiling with AOTInductor for batch 1..{max_batch} (a minute or two on a CPU)", flush=True)
    options = {k: aoti[k] for k in ("freezing", "max_autotune")}
    torch._inductor.aoti_compile_and_package(program, package_path=str(path), inductor_configs=options)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default="runs/latest/bundle")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--forms", nargs="+", choices=["aoti", *ONNX_FILES], default=["aoti", *ONNX_FILES])
    ap.add_argument("--max-batch", type=int, default=8, help="the largest batch (serve/model-config.yaml batchSize)")
    ap.add_argument("--no-freezing", dest="freezing", action="store_false")
    ap.add_argument("--max-autotune", action="store_true")
    ap.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    ap.add_argument("--tolerance", type=float, default=TOLERANCE)
    ap.add_argument("--calibration", type=int, default=300, help="validation images int8 is calibrated on")
    ap.add_argument("--int8-agreement", type=float, default=INT8_CHECKS["agreement"],
                    help="int8's top-1 agreement with eager on the test split, at least")  # fmt: skip
    ap.add_argument("--int8-accuracy-points", type=float, default=INT8_CHECKS["accuracy_points"],
                    help="int8's test accuracy within this many points of eager's")  # fmt: skip
    ap.add_argument("--int8-auroc", type=float, default=INT8_CHECKS["auroc"],
                    help="int8's OOD AUROC on each set within this of eager's")  # fmt: skip
    ap.add_argument("--if-missing", action="store_true", help="only if the bundle has no forms for the device yet "
                    "(make archive: the served default is the fastest form)")  # fmt: skip
    args = ap.parse_args(argv)
    meta_file = Path(args.bundle) / META_FILE
    if args.if_missing and meta_file.is_file() and json.loads(meta_file.read_text()).get("forms", {}).get(args.device):
        print(f"{args.bundle}: forms for {args.device} exported already (make export to export again)")
        return 0
    try:
        export_bundle(args.bundle, device=args.device, forms=tuple(args.forms), max_batch=args.max_batch,
                      freezing=args.freezing, max_autotune=args.max_autotune, channels_last=args.channels_last,
                      tolerance=args.tolerance, calibration=args.calibration,
                      int8_checks={"agreement": args.int8_agreement, "accuracy_points": args.int8_accuracy_points,
                                   "auroc": args.int8_auroc})  # fmt: skip
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(str(e)) from None
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
