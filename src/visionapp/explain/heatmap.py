"""Captum attribution heatmaps for your images, from a trained bundle.

    python explain/heatmap.py --bundle runs/latest/bundle --images photo.jpg some/folder \
        --method integrated_gradients --out heatmaps/

One PNG per image: the original, the heatmap and the overlay, at the original image's size and aspect
ratio, titled with the predicted class and its probability (and the explained class when you pick one
with --target). Unreadable files are reported by name and skipped; the exit code is 1 if any failed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import numpy as np
import torch
from captum.attr import visualization as viz
from rich.progress import track

from visionapp.attribution.maps import Explanation, explain, target_index
from visionapp.attribution.methods import METHODS, check_method
from visionapp.bundle import load_bundle
from visionapp.decode import load_image
from visionapp.errors import run_main
from visionapp.imagefiles import expand


def save_figure(e: Explanation, method: str, path: Path) -> None:
    """Original | heatmap | overlay; the heat panels drawn by Captum's own visualisation."""
    from matplotlib.figure import Figure

    original = np.asarray(e.image, dtype=np.float32) / 255
    title = f"predicted {e.predicted} ({e.probability:.1%})"
    if e.target != e.predicted:
        title += f", explaining {e.target} ({e.target_probability:.1%})"
    if e.ood is not None:
        title += f"; out of distribution (score {e.ood[0]:.3g})" if e.ood[1] else "; in distribution"
    fig = Figure(figsize=(12, 4.6), layout="constrained")
    axes = fig.subplots(1, 3)
    axes[0].imshow(original)
    axes[0].set_title("image")
    axes[0].axis("off")
    if (e.attr_map > 0).any():
        for ax, kind, name in ((axes[1], "heat_map", method), (axes[2], "blended_heat_map", "overlay")):
            viz.visualize_image_attr(
                e.attr_map[..., None],
                original,
                kind,
                sign="positive",
                plt_fig_axis=(fig, ax),
                title=name,
                use_pyplot=False,
            )
    else:  # Captum cannot scale an all-zero map; say so instead of drawing noise
        for ax in axes[1:]:
            ax.imshow(original)
            ax.set_title(f"{method}: no positive attribution")
            ax.axis("off")
    fig.suptitle(title)
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default="runs/latest/bundle", help="a run's bundle/ folder")
    ap.add_argument("--images", nargs="+", required=True, help="image files and/or folders")
    ap.add_argument("--method", default="integrated_gradients", help=f"one of {', '.join(METHODS)}")
    ap.add_argument("--target", default=None, help="explain this class (by name) instead of the predicted one")
    ap.add_argument("--ig-steps", type=int, default=50, help="integrated gradients: Riemann steps")
    ap.add_argument("--smooth", type=int, default=0, help="integrated gradients: NoiseTunnel samples (0 = off)")
    ap.add_argument("--out", default="heatmaps", help="output folder for the PNGs")
    args = ap.parse_args(argv)
    try:
        check_method(args.method)
        bundle = load_bundle(args.bundle)
        if args.target is not None:
            target_index(bundle.class_names, args.target)
    except (ValueError, FileNotFoundError) as e:
        ap.error(str(e))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bundle.model.to(device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files, failed = expand(args.images), []
    stems = [f.stem for f in files]  # IMG_0001.jpg in two class folders: both heatmaps kept, named by folder
    for f in track(files, description=f"{args.method} heatmaps"):
        try:
            image = load_image(f)
        except Exception as e:  # not an image, truncated, missing: report, skip, carry on with the rest
            failed.append(f)
            print(f"skipped {f}: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        result = explain(
            bundle,
            image,
            args.method,
            target=args.target,
            ig_steps=args.ig_steps,
            nt_samples=args.smooth,
            device=device,
        )
        name = f.stem if stems.count(f.stem) == 1 else f"{f.parent.name}_{f.stem}"
        save_figure(result, args.method, out / f"{name}_{args.method}.png")
    print(f"wrote {len(files) - len(failed)} heatmaps to {out}" + (f"; {len(failed)} failed" if failed else ""))
    return 1 if failed or not files else 0


if __name__ == "__main__":
    sys.exit(run_main(main))
