"""Compile the bundle's model ahead of time for serving: torch.export + AOTInductor (`make export`).

    python -m visionapp.deploy.export --bundle runs/latest/bundle [--max-batch 8] [--device cpu|cuda]

Exports the plain model with a dynamic batch dimension (1 .. --max-batch; the spatial size is the bundle's),
compiles it with AOTInductor into a self-contained package, bundle/model.<device>.pt2, that Python loads
without the model's code (`load_bundle(..., compiled=True)`), and checks it right away: its logits on a batch
of the run's real test images must equal the eager model's within --tolerance (1e-4), else the package is
deleted and the export refused with the difference printed. model.json's "compiled" section records the file,
device, torch version, CPU instruction set, batch range, options and times. The eager state_dict stays: it is
what Captum explains and what serves wherever the package does not fit (another device, torch or CPU).

Options (AOTInductor's own levers; each measured by python -m visionapp.bench.compiled): freezing (on: weights
become constants, so BatchNorm folds into the convolutions and oneDNN prepacks the weights), channels-last (on:
NHWC activations, the layout oneDNN's convolutions run in; the input is converted once, by the caller),
--max-autotune (off: kernel choices benchmarked while compiling; its gain varied from 1.16x to 1.9x between
runs here, channels-last's stayed at 1.45-1.5x).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from visionapp.bundle import (
    META_FILE,
    Bundle,
    compiled_file,
    cpu_isa,
    file_sha256,
    load_bundle,
    run_test_images,
    write_meta,
)
from visionapp.errors import run_main
from visionapp.transforms import load_image

TOLERANCE = 1e-4


def check_batch(bundle: Bundle, bundle_dir: Path, n: int) -> torch.Tensor:
    """Up to n of the run's test images, preprocessed as served (random inputs where the run has none)."""
    files = run_test_images(bundle_dir.parent)[:n]
    if not files:
        print(f"  no test images for the run {bundle_dir.parent}: checking on random inputs", flush=True)
        size = bundle.meta["image_size"]
        return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))
    return torch.stack([bundle.transform(load_image(f)) for f in files])


def export_bundle(
    bundle_dir: str | Path,
    *,
    device: str = "cpu",
    max_batch: int = 8,
    freezing: bool = True,
    max_autotune: bool = False,
    channels_last: bool = True,
    tolerance: float = TOLERANCE,
) -> dict[str, Any]:
    """Write bundle/model.<device>.pt2 and record it in model.json; the record, or ValueError if refused.

    Compiled under a temporary name and renamed over the package only once checked: a refused or interrupted
    export leaves the previous package and its record in model.json as they were."""
    bundle_dir = Path(bundle_dir)
    bundle = load_bundle(bundle_dir, map_location=device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = bundle.model.to(device).to(memory_format=memory_format)
    options = {"freezing": freezing, "max_autotune": max_autotune}
    package = bundle_dir / compiled_file(device)
    candidate = bundle_dir / f".{package.stem}.tmp-{os.getpid()}.pt2"  # AOTInductor wants the .pt2 suffix
    try:
        seconds = compile_package(model, bundle.meta, candidate, device, max_batch, memory_format, options)
        x = check_batch(bundle, bundle_dir, max_batch).to(device).contiguous(memory_format=memory_format)
        diff = max_difference(candidate, model, x)
        if not diff <= tolerance:
            kept = f"{package.name} as it was" if package.is_file() else "the eager model"
            raise ValueError(
                f"refused: the compiled model's logits differ from the eager model's by {diff:.3g} on {len(x)} "
                f"test images (tolerance {tolerance:g}); nothing was changed, the bundle serves {kept}"
            )
        digest = file_sha256(candidate)  # of the file checked: model.json refuses any other at load time
        os.replace(candidate, package)
    finally:
        candidate.unlink(missing_ok=True)
    record = {
        "file": package.name, "device": device, "torch": torch.__version__,
        "cpu_isa": cpu_isa() if device == "cpu" else None, "batch": [1, max_batch],
        "image_size": bundle.meta["image_size"], "channels_last": channels_last, "options": options,
        "max_abs_diff": diff, "checked_images": len(x), "seconds": seconds, "sha256": digest,
    }  # fmt: skip
    meta = json.loads((bundle_dir / META_FILE).read_text())
    meta.setdefault("compiled", {})[device] = record
    write_meta(bundle_dir, meta)
    print(f"  checked on {len(x)} test images: max |compiled - eager| = {diff:.2g} (≤ {tolerance:g}); "
          f"recorded in {bundle_dir / META_FILE}", flush=True)  # fmt: skip
    return record


def compile_package(
    model: torch.nn.Module,
    meta: dict[str, Any],
    path: Path,
    device: str,
    max_batch: int,
    memory_format: torch.memory_format,
    options: dict[str, bool],
) -> dict[str, float]:
    """torch.export with a dynamic batch of 1..max_batch, then AOTInductor into the package at `path`; the seconds
    each took."""
    size = meta["image_size"]
    # An example batch of 2: a batch of 1 would be specialised to the constant 1 (0/1 specialisation).
    example = torch.randn(2, 3, size, size, device=device).contiguous(memory_format=memory_format)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    print(f"exporting {meta['arch']} at {size} px, batch 1..{max_batch}, on {device}, {options}", flush=True)
    t0 = time.perf_counter()
    with torch.no_grad():
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    t1 = time.perf_counter()
    print(f"  exported in {t1 - t0:.1f} s; compiling with AOTInductor (a minute or two on a CPU)", flush=True)
    torch._inductor.aoti_compile_and_package(program, package_path=str(path), inductor_configs=dict(options))
    t2 = time.perf_counter()
    print(f"  compiled in {t2 - t1:.1f} s ({path.stat().st_size / 1e6:.1f} MB)", flush=True)
    return {"export": round(t1 - t0, 1), "compile": round(t2 - t1, 1)}


def max_difference(package: Path, model: torch.nn.Module, x: torch.Tensor) -> float:
    """The largest |logit| difference between the compiled package and the eager model, on x and on x[:1]."""
    compiled = torch._inductor.aoti_load_package(str(package))
    with torch.inference_mode():
        return max((compiled(xs) - model(xs)).abs().max().item() for xs in (x, x[:1]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default="runs/latest/bundle")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--max-batch", type=int, default=8, help="the largest batch (serve/model-config.yaml batchSize)")
    ap.add_argument("--no-freezing", dest="freezing", action="store_false")
    ap.add_argument("--max-autotune", action="store_true")
    ap.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    ap.add_argument("--tolerance", type=float, default=TOLERANCE)
    args = ap.parse_args(argv)
    try:
        export_bundle(args.bundle, device=args.device, max_batch=args.max_batch, freezing=args.freezing,
                      max_autotune=args.max_autotune, channels_last=args.channels_last,
                      tolerance=args.tolerance)  # fmt: skip
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(str(e)) from None
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
