"""Measure the quality of each attribution method on a run's test split and draw sample heatmaps.

    python -m visionapp.explain --run runs/latest    (make explain) [--samples 50] [--heatmaps 2]

Writes <run>/explanations/quality.json (one entry per method) and <run>/explanations/<method>/*.png,
and prints the table. Metrics per method:
  pointing_game           share of images whose attribution maximum lies inside the ground-truth mask
  mass_in_mask            share of the positive attribution that lies inside the mask
  infidelity              captum.metrics.infidelity (Gaussian perturbations, normalised; lower is better)
  sensitivity_max         captum.metrics.sensitivity_max (radius 0.02; lower is better)
  randomization_spearman  mean Spearman correlation between the trained model's maps and those of the same
                          architecture re-initialised (Adebayo et al. 2018); < 0.5 means the map depends on
                          what the model learned
  randomization_undefined maps (of either model) that are constant, so have no ranking: each fails the check
  seconds_per_image       wall time of the attribution alone
Mask metrics need the shapes data set's masks; for other data they are skipped with a message.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from captum.metrics import infidelity, sensitivity_max
from PIL import Image
from rich.console import Console
from rich.progress import track
from rich.table import Table
from scipy.stats import ConstantInputWarning, spearmanr
from torch import nn

from visionapp import run_report
from visionapp.attribution.maps import Explanation, attribute, equivalent_passes, to_original_size
from visionapp.attribution.methods import METHODS, check_method
from visionapp.bundle import Bundle, load_bundle, run_test_images
from visionapp.decode import load_image
from visionapp.explain.heatmap import save_figure
from visionapp.shapes import mask_path

METRIC_KEYS = (
    "pointing_game",
    "mass_in_mask",
    "infidelity",
    "sensitivity_max",
    "randomization_spearman",
    "randomization_undefined",
    "seconds_per_image",
)


def pointing_game(maps: torch.Tensor, masks: torch.Tensor) -> float:
    """Share of maps (N, H, W) whose maximum falls inside the boolean mask (N, H, W)."""
    idx = maps.flatten(1).argmax(1)
    return masks.flatten(1).gather(1, idx[:, None]).float().mean().item()


def mass_in_mask(maps: torch.Tensor, masks: torch.Tensor) -> float:
    """Mean over images of the share of positive attribution inside the mask."""
    pos = maps.clamp(min=0).flatten(1)
    inside = (pos * masks.flatten(1)).sum(1)
    return (inside / pos.sum(1).clamp(min=1e-12)).mean().item()


def randomized_copy(model: nn.Module, seed: int = 0) -> nn.Module:
    """The same architecture with every layer re-initialised (weights and BatchNorm statistics)."""
    torch.manual_seed(seed)
    rnd = copy.deepcopy(model)
    for m in rnd.modules():
        reset = getattr(m, "reset_parameters", None)
        if callable(reset):
            reset()
    return rnd.eval()


def spearman(a: torch.Tensor, b: torch.Tensor) -> tuple[float, int]:
    """Mean per-image Spearman rank correlation between two sets of maps, over the images where it is defined,
    and how many it is not: a constant map has no ranking. Those count against the randomisation check (a
    method that gives a flat map has shown nothing), reported beside the mean instead of being taken as 0."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConstantInputWarning)  # counted below
        rs = np.array(
            [spearmanr(x.flatten().numpy(), y.flatten().numpy()).statistic for x, y in zip(a, b, strict=True)]
        )
    defined = rs[~np.isnan(rs)]
    return (float(defined.mean()) if len(defined) else float("nan")), int(np.isnan(rs).sum())


def method_vs_passes(model: nn.Module, x: torch.Tensor, method: str, repeats: int = 5) -> dict[str, float]:
    """One image's attribution vs the model passes it is made of (`equivalent_passes`), done as batches of
    the same size as captum's (64 images): alternated, repeated, medians. The ratio is the method's overhead."""
    n, backward = equivalent_passes(method, *x.shape[-2:])
    target = torch.zeros(1, dtype=torch.long)
    chunks = [x.repeat(min(64, n - i), 1, 1, 1).requires_grad_(backward) for i in range(0, n, 64)]
    method_t, pass_t = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        attribute(model, x, target, method)
        method_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        for batch in chunks:
            if backward:
                model(batch)[:, 0].sum().backward()
                batch.grad = None
            else:
                with torch.no_grad():
                    model(batch)
        pass_t.append(time.perf_counter() - t)
    seconds, passes = statistics.median(method_t), statistics.median(pass_t)
    return {"seconds": seconds, "passes": n, "backward": backward, "passes_seconds": passes, "ratio": seconds / passes}


def metric_subset(n: int, k: int) -> list[int]:
    """k indices spread evenly over a class-sorted sample of n: every class is represented, not the first."""
    return sorted({int(i) for i in np.linspace(0, n - 1, min(k, n)).round()})


def default_metric_samples(image_size: int) -> int:
    """Images for the costly metrics: 8 at 96 px, fewer as the cost per attribution grows with the pixels
    (2 at 224 px), so that `make explain` stays within a few minutes on a laptop's CPU."""
    return max(2, min(8, round(8 * 96 * 96 / image_size**2)))


@dataclass
class Sample:
    """The test images measured on, preprocessed, with their predicted classes and (shapes data) masks."""

    files: list[Path]
    images: list[Image.Image]
    x: torch.Tensor  # (N, 3, H, W), normalised
    probs: torch.Tensor  # calibrated, as the heatmap titles say
    target: torch.Tensor  # the predicted classes: what each map explains
    masks: torch.Tensor | None  # (N, H, W) booleans at the input size; None without ground truth
    subset: list[int]  # the images for the costly metrics, spread over the classes


def evaluate(
    run: Path,
    *,
    samples: int = 50,
    metric_samples: int | None = None,
    methods: tuple[str, ...] = tuple(METHODS),
    heatmaps: int = 2,
    seed: int = 0,
    console: Console | None = None,
) -> dict:
    """Measure each method on a seeded sample of the run's test split; write quality.json and sample heatmaps,
    print the table and refresh the run report."""
    console = console or Console(width=150)
    started = time.perf_counter()

    def say(text: str) -> None:  # plain lines, so a log file shows the progress too
        console.print(f"[{time.perf_counter() - started:6.1f} s] {text}", highlight=False)

    bundle = load_bundle(run / "bundle")
    for p in bundle.model.parameters():
        p.requires_grad_(False)  # attributions need input gradients only
    k = metric_samples or default_metric_samples(bundle.transform.image_size)
    sample = load_sample(run, bundle, samples, k, seed, console)
    say(
        f"{len(sample.x)} test images for the maps, {len(sample.subset)} of them (spread over the classes) for "
        f"infidelity, sensitivity and randomisation; {sample.x.shape[-1]} px"
    )
    randomized = randomized_copy(bundle.model)
    for p in randomized.parameters():
        p.requires_grad_(False)
    out_dir = run / "explanations"
    results: dict[str, dict] = {}
    for method in methods:
        check_method(method)
        results[method], amaps = measure(bundle.model, randomized, sample, method, seed, say)
        draw_samples(bundle.class_names, sample, amaps, method, heatmaps, out_dir / method)
        say(f"{method}: done")
    report = {
        "run": str(run),
        "samples": len(sample.x),
        "metric_samples": len(sample.subset),
        "methods": results,
        "ig50_vs_passes": method_vs_passes(bundle.model, sample.x[:1], "integrated_gradients", repeats=3),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "quality.json").write_text(json.dumps(report, indent=2))
    print_table(report, console)
    say(f"wrote {out_dir / 'quality.json'} and sample heatmaps under {out_dir}; {run_report.build(run)} updated")
    return report


def load_sample(run: Path, bundle: Bundle, samples: int, k: int, seed: int, console: Console) -> Sample:
    """A seeded sample of the run's test images (sorted by class), preprocessed and predicted; with the shapes'
    masks when every image has one, else only the metric subset (the maps of the rest serve the mask metrics)."""
    files = sorted(run_test_images(run), key=lambda f: (f.parent.name, f.name))
    if not files:
        raise SystemExit(f"no test images for {run} (test_files.txt or its data root's test/); run `make train` first")
    rng = np.random.default_rng(seed)
    files = [files[i] for i in sorted(rng.choice(len(files), size=min(samples, len(files)), replace=False))]
    mask_files = [m for m in map(mask_path, files) if m is not None]
    have_masks = len(mask_files) == len(files)
    if not have_masks:
        console.print("[yellow]the test split has no ground-truth masks: pointing_game and mass_in_mask skipped")
        files = [files[i] for i in metric_subset(len(files), k)]
    images = [load_image(f) for f in files]
    x = torch.stack([bundle.transform(im) for im in images])
    with torch.no_grad():
        probs = bundle.probabilities(x)
    masks = None
    if have_masks:
        h, w = int(x.shape[-2]), int(x.shape[-1])
        masks = torch.stack(
            [
                torch.from_numpy(np.asarray(Image.open(m).resize((w, h), Image.Resampling.NEAREST)) > 0)
                for m in mask_files
            ]
        )
    return Sample(files, images, x, probs, probs.argmax(1), masks, metric_subset(len(x), k))


SENSITIVITY_PERTURBATIONS = 3


def measure(
    model: nn.Module, randomized: nn.Module, sample: Sample, method: str, seed: int, say: Callable[[str], None]
) -> tuple[dict, torch.Tensor]:
    """One method's quality entry, and its maps of the whole sample (N, H, W)."""
    x, target, subset = sample.x, sample.target, sample.subset
    t = time.perf_counter()
    attribute(model, x[:1], target[:1], method)
    each = time.perf_counter() - t
    planned = len(x) + len(subset) * (SENSITIVITY_PERTURBATIONS + 1)  # maps, sensitivity, randomisation
    say(f"{method}: {planned} attributions, ~{each:.2f} s each: ~{planned * each:.0f} s")
    per_channel, seconds = [], 0.0
    for i in track(range(0, len(x), 10), description=f"{method:>22}", transient=True):
        t = time.perf_counter()
        per_channel.append(attribute(model, x[i : i + 10], target[i : i + 10], method, reduce=False))
        seconds += time.perf_counter() - t
    raw_all = torch.cat(per_channel)  # computed once: the maps below and captum.metrics' inputs
    amaps = raw_all.sum(dim=1)
    entry: dict[str, float | bool | None] = {"seconds_per_image": seconds / len(x)}
    entry["pointing_game"] = pointing_game(amaps, sample.masks) if sample.masks is not None else None
    entry["mass_in_mask"] = mass_in_mask(amaps, sample.masks) if sample.masks is not None else None
    say(f"{method}: {len(x)} maps in {seconds:.1f} s")
    xs, ts = x[subset], target[subset]
    torch.manual_seed(seed)
    entry["infidelity"] = infidelity(model, _noise, xs, raw_all[subset], target=ts, n_perturb_samples=10,
                                     normalize=True).mean().item()  # fmt: skip

    def explanation(inputs: tuple[torch.Tensor], target: torch.Tensor, method: str = method) -> tuple:
        # sensitivity_max hands inputs over as a 1-tuple and wants the attributions in the same structure
        return (attribute(model, inputs[0], target, method, reduce=False),)

    entry["sensitivity_max"] = sensitivity_max(explanation, (xs,), target=ts, perturb_radius=0.02,
                                               n_perturb_samples=SENSITIVITY_PERTURBATIONS).mean().item()  # fmt: skip
    say(f"{method}: infidelity and sensitivity done")
    rho, undefined = spearman(amaps[subset], attribute(randomized, xs, ts, method))
    entry["randomization_spearman"], entry["randomization_undefined"] = rho, undefined
    entry["randomization_passed"] = bool(rho < 0.5 and undefined == 0)
    return entry, amaps


def _noise(inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = torch.randn_like(inputs) * 0.1
    return n, inputs - n


def draw_samples(
    class_names: list[str], sample: Sample, amaps: torch.Tensor, method: str, n: int, out_dir: Path
) -> None:
    """n heatmap figures spread over the classes, from the maps already computed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for i in metric_subset(len(sample.files), n) if n else []:
        image, name, p = sample.images[i], class_names[int(sample.target[i])], float(sample.probs[i].max())
        e = Explanation(image, to_original_size(amaps[i], image.size), name, p, name, p)
        save_figure(e, method, out_dir / f"{sample.files[i].parent.name}_{sample.files[i].stem}.png")


def print_table(report: dict, console: Console) -> None:
    keys = METRIC_KEYS
    table = Table(title=f"Attribution quality, {report['samples']} test images ({report['run']})")
    table.add_column("method")
    for k in keys:
        table.add_column(k, justify="right")
    for method, e in report["methods"].items():
        table.add_row(method, *("—" if e[k] is None else f"{e[k]:.3g}" for k in keys))
    console.print(table)
    r = report["ig50_vs_passes"]
    console.print(
        f"integrated gradients, 50 steps, 1 image: {r['seconds'] * 1e3:.0f} ms vs 50 forward+backward "
        f"passes as one batch: {r['passes_seconds'] * 1e3:.0f} ms (ratio {r['ratio']:.2f})"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/latest", help="a run directory (with bundle/ and metrics.json)")
    ap.add_argument("--samples", type=int, default=50, help="test images (seeded sample) for the map metrics")
    ap.add_argument(
        "--metric-samples",
        type=int,
        default=None,
        help="images for infidelity, sensitivity, randomisation (default: 8 at 96 px, 2 at 224 px)",
    )
    ap.add_argument("--methods", nargs="+", default=list(METHODS), help=f"any of {', '.join(METHODS)}")
    ap.add_argument("--heatmaps", type=int, default=2, help="sample heatmap PNGs to draw per method")
    args = ap.parse_args(argv)
    try:
        for m in args.methods:
            check_method(m)
    except ValueError as e:
        ap.error(str(e))
    evaluate(
        Path(args.run),
        samples=args.samples,
        metric_samples=args.metric_samples,
        methods=tuple(args.methods),
        heatmaps=args.heatmaps,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
