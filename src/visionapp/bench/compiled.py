"""The compiled model's levers side by side: the forward pass alone, eager vs AOTInductor with each option.

    python -m visionapp.bench.compiled --bundle runs/latest/bundle [--image-size 224] [--rounds 3]

Contenders (each compiled by make export's code into a temporary copy of the bundle, checked against eager):
  eager, eager_channels_last          the state_dict as loaded; the same in NHWC
  aoti                                torch.export + AOTInductor, no options
  aoti_freezing                       + freezing (BatchNorm folded into the convolutions, weights prepacked)
  aoti_freezing_channels_last         + NHWC inputs: make export's default
  aoti_freezing_max_autotune          + max-autotune (kernel choices benchmarked while compiling)
Medians of milliseconds at batch 1 and 8 over --rounds rounds, contenders alternated; compile seconds.
Writes bench/export_results.json and prints a table.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from visionapp.bench.serve import staged_bundle, timed
from visionapp.bundle import form_runner, load_bundle
from visionapp.deploy.export import export_bundle

VARIANTS = {
    "aoti": {"freezing": False, "max_autotune": False, "channels_last": False},
    "aoti_freezing": {"freezing": True, "max_autotune": False, "channels_last": False},
    "aoti_freezing_channels_last": {"freezing": True, "max_autotune": False, "channels_last": True},
    "aoti_freezing_max_autotune": {"freezing": True, "max_autotune": True, "channels_last": False},
}


def median_ms(fn: Callable[[torch.Tensor], object], x: torch.Tensor, repeats: int) -> float:
    fn(x)  # warm
    return statistics.median(timed(functools.partial(fn, x), repeats)) * 1e3


def _loaded(package: Path, channels_last: bool) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The package's forward (its logits and features), its input converted as it was exported for."""
    return form_runner(package, "aoti", {"batch": [1, 8], "channels_last": channels_last})


def run(bundle_dir: Path, image_size: int | None, rounds: int, repeats: int) -> dict:
    contenders: dict[str, Callable[[torch.Tensor], object]] = {}
    compile_seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        # a CNN takes any size: another image size is for timing only
        resize = {"image_size": image_size} if image_size else {}
        staging = staged_bundle(bundle_dir, Path(tmp) / "run" / "bundle", **resize)
        eager = load_bundle(staging)
        contenders["eager"] = eager.model
        eager_cl = load_bundle(staging).model.to(memory_format=torch.channels_last)
        contenders["eager_channels_last"] = lambda x: eager_cl(x.contiguous(memory_format=torch.channels_last))
        for name, options in VARIANTS.items():
            record = export_bundle(staging, forms=("aoti",), freezing=options["freezing"],
                                   max_autotune=options["max_autotune"],
                                   channels_last=options["channels_last"])["aoti"]  # fmt: skip
            kept = Path(tmp) / f"{name}.pt2"
            shutil.move(staging / record["file"], kept)
            compile_seconds[name] = record["seconds"]
            contenders[name] = _loaded(kept, options["channels_last"])
        size = eager.meta["image_size"]
        times: dict[str, dict[str, list[float]]] = {n: {"b1": [], "b8": []} for n in contenders}
        with torch.inference_mode():
            for _ in range(rounds):
                for b in (1, 8):
                    x = torch.randn(b, 3, size, size)
                    for name, fn in contenders.items():
                        times[name][f"b{b}"].append(median_ms(fn, x, repeats))
    ms = {n: {b: statistics.median(v) for b, v in per.items()} for n, per in times.items()}
    return {"image_size": size, "ms": ms, "compile_seconds": compile_seconds,
            "speedup_vs_eager": {n: {b: ms["eager"][b] / v for b, v in per.items()} for n, per in ms.items()},
            "threads": torch.get_num_threads(), "raw": times}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default="runs/latest/bundle")
    ap.add_argument("--image-size", type=int, default=None, help="default: the bundle's")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default="bench/export_results.json")
    args = ap.parse_args(argv)
    result = run(Path(args.bundle), args.image_size, args.rounds, args.repeats)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nforward pass at {result['image_size']} px, {result['threads']} threads (median ms; speed-up vs eager)")
    for name, per in result["ms"].items():
        s = result["speedup_vs_eager"][name]
        compile_s = f"  compile {result['compile_seconds'][name]:.1f} s" if name in result["compile_seconds"] else ""
        print(f"  {name:30s} b1 {per['b1']:7.1f} ({s['b1']:.2f}×)  b8 {per['b8']:7.1f} ({s['b8']:.2f}×){compile_s}")
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
