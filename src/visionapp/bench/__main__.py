"""`make bench`: every stage against its peer and its ceiling, side by side, in one run → bench/results.json.

    python -m visionapp.bench [--run runs/latest] [--rounds 3]

  train    Lightning fit vs a plain loop vs the compute ceiling (visionapp.bench.train), on the CPU, and the
           input paths against each other (decode-once cache, files decoded every epoch, batched crops),
           at the default config's 96 px and again at 224 px (the loader alone and the plain loop)
  forms    the model's forms (make export's code, on a copy of the bundle): each form's checks (int8's accuracy and
           agreement on the run's test split) and the forward pass alone of each, at the model's own size
  serve    at 224 px (serve_224px: ImageNet's size, at which the stock handler runs; the same weights, for timing
           only): our handler in process vs our TorchServe vs KServe's server, both running the default form,
           vs the stock TorchServe handler (visionapp.bench.serve); and the forms' forward pass alone there
  explain  seconds per image of each Captum method vs the model passes it is made of (visionapp.explain.quality)
  ood      the out-of-distribution score's cost per image (a prediction with it vs without), and the run's own
           AUROC on held-out shapes (near) and other kinds of image (far), against the maximum-softmax baseline
Each comparison alternates its contenders over --rounds rounds and reports medians with [min..max].
results.json holds the machine, the library versions, every raw figure and the ratio keys below.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from visionapp.attribution.methods import METHODS
from visionapp.bench import markdown
from visionapp.bench import predict as predict_bench
from visionapp.bench import serve as serve_bench
from visionapp.bench import train as train_bench
from visionapp.bundle import load_bundle, run_test_images, versions
from visionapp.decode import load_image
from visionapp.explain.quality import method_vs_passes


@dataclass(frozen=True)
class Goal:
    value: float
    kind: str  # "min": the ratio must reach the value; "max": it must stay under it
    why: str


GOALS = {
    "train.loop_vs_ceiling": Goal(0.9, "min", "the input pipeline must not starve the model"),
    "train.cache_loader_vs_file_loader_224px": Goal(
        2.0, "min", "at 224 px the decode-once loader must deliver twice the images/s of decoding every epoch"
    ),
    "train.lightning_vs_loop": Goal(0.97, "min", "Lightning may cost at most 3% over a plain loop"),
    "serve.p50_vs_inprocess_c1_224px": Goal(1.15, "max", "TorchServe may add at most 15% to a lone request"),
    "serve.throughput_vs_inprocess_c8_224px": Goal(
        0.8, "min", "batching must recover most of the in-process batch speed"
    ),
    "serve.kserve_p50_vs_inprocess_c1_224px": Goal(1.15, "max", "KServe's model server may add what TorchServe may"),
    "serve.kserve_throughput_vs_torchserve_c8_224px": Goal(
        1.0, "min", "KServe's server, batching in the serving core, against ours on TorchServe at concurrency 8"
    ),
    "serve.kserve_throughput_vs_inprocess_c8_224px": Goal(
        0.8, "min", "KServe's batching recovers most of the in-process batch speed"
    ),
    "serve.kserve_ready_p99_ms_saturated": Goal(
        100, "max", "readiness answered while the server is saturated: the event loop never runs a forward pass"
    ),
    "serve.predict_p50_during_explanations_vs_idle_224px": Goal(
        3.0, "max", "4 occlusion explanations in flight: a lone prediction at most 3x its idle p50 (2 shared cores)"
    ),
    "serve.default_form_vs_stock_c8_224px": Goal(
        2.5, "min", "ours with the default form (make export) against the stock handler users start from, same size"
    ),
    "serve.default_form_p50_vs_stock_c1_224px": Goal(0.8, "max", "the same for a lone request's latency"),
    "serve.slim_throughput_vs_torch_c8_224px": Goal(
        1.0, "min", "KServe's server without torch answers as fast as with it, on the same form"
    ),
    "serve.slim_ready_seconds_vs_torch": Goal(0.5, "max", "without torch, the server is ready in half the time"),
    "infer.int8_vs_eager_b8_224px": Goal(3.5, "min", "the int8 ONNX form's forward pass against eager, batch 8"),
    "infer.default_vs_eager_b8_224px": Goal(1.0, "min", "the default form is never slower than eager"),
    "forms.int8_agreement": Goal(0.99, "min", "int8's top-1 equals the eager model's on the run's test split"),
    "forms.int8_accuracy_delta_points": Goal(0.5, "max", "int8's test accuracy within half a point of eager's"),
    "export.seconds": Goal(180, "max", "make export: every form exported and checked, the default model"),
    "explain.ig50_vs_passes": Goal(1.3, "max", "Captum's overhead over the model passes it makes"),
    "explain.response_bytes_vs_stock": Goal(0.02, "max", "a heatmap PNG, not raw attributions as JSON"),
    "predict.vs_forward_ceiling_224px": Goal(
        0.8, "min", "scoring a folder of photos should run near the forward pass alone: decoding overlaps the model"
    ),
    "predict.vs_served_c8_224px": Goal(1.2, "min", "a folder through Trainer.predict beats sending it to the server"),
    "ood.auroc_far": Goal(0.99, "min", "images of another kind (noise, colour fields, blocks) told from the classes"),
    "ood.auroc_near": Goal(0.90, "min", "held-out shapes in the classes' own style told from the classes"),
    "ood.auroc_near_vs_msp": Goal(1.0, "min", "the served score beats the maximum-softmax baseline on near"),
    "ood.predict_with_score_vs_without": Goal(
        1.10, "max", "the score rides on the prediction's own forward pass: at most a tenth more per image"
    ),
}
REFERENCE_SIZE = 224  # ImageNet's size, at which the stock handler always runs: the serving goals hold there too
PACKAGES = ("lightning", "torchmetrics", "captum", "torchserve", "torch-model-archiver")  # beside python, torch(vision)


def explain_bench(bundle_dir: Path, image: Path, rounds: int) -> dict:
    bundle = load_bundle(bundle_dir)
    for p in bundle.model.parameters():
        p.requires_grad_(False)  # attributions need input gradients only
    x = bundle.transform(load_image(image))[None]
    runs = {m: [method_vs_passes(bundle.model, x, m, repeats=3) for _ in range(rounds)] for m in METHODS}
    per_method = {}
    for m, rs in runs.items():
        ratios = [r["ratio"] for r in rs]
        per_method[m] = {"seconds": statistics.median(r["seconds"] for r in rs), "passes": rs[0]["passes"],
                         "backward": rs[0]["backward"],
                         "passes_seconds": statistics.median(r["passes_seconds"] for r in rs),
                         "ratio": statistics.median(ratios), "ratio_spread": [min(ratios), max(ratios)]}  # fmt: skip
    return {"image_size": list(x.shape[-2:]), "methods": per_method, "raw": runs}


def ood_bench(run_dir: Path, served: Path, image: Path, rounds: int, repeats: int = 200) -> dict:
    """The run's OOD figures (metrics.json), and a prediction with the score against one without, in process, on
    the bundle the serving part served (`served`: staged at 224 px, exported, in the form the servers ran)."""
    measured = json.loads((run_dir / "metrics.json").read_text()).get("ood")
    if not measured:
        raise SystemExit(f"{run_dir} has no out-of-distribution record (trained before the scores): make train")
    bundle = load_bundle(served, runtime="auto")
    x = bundle.transform(load_image(image))[None]
    contenders = {"with": lambda: bundle.answer(x), "without": lambda: bundle.probabilities(x)}
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    with torch.inference_mode():
        for _ in range(20):
            bundle.answer(x)
        for _ in range(rounds):
            for name, fn in contenders.items():
                start = time.perf_counter()
                for _ in range(repeats):
                    fn()
                seconds[name].append((time.perf_counter() - start) / repeats)
    with_, without = statistics.median(seconds["with"]), statistics.median(seconds["without"])
    return {
        "method": measured["method"], "threshold": measured["threshold"], "methods": measured["methods"],
        "ms_with_score": with_ * 1e3, "ms_without": without * 1e3, "raw_seconds": seconds, "form": bundle.form,
        "image_size": json.loads((served / "model.json").read_text())["image_size"],
        "ood.auroc_far": measured["auroc_far"], "ood.auroc_near": measured["auroc_near"],
        "ood.auroc_near_vs_msp": measured["auroc_near"] / measured["methods"]["msp"]["auroc_near"],
        "ood.predict_with_score_vs_without": with_ / without,
    }  # fmt: skip


def verdict(key: str, value: float) -> str:
    goal = GOALS[key]
    met = value >= goal.value if goal.kind == "min" else value <= goal.value
    return f"{'met' if met else 'MISSED'} (goal {'≥' if goal.kind == 'min' else '≤'} {goal.value})"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/latest", help="the trained run whose bundle is served and explained")
    ap.add_argument("--forms", nargs="*", choices=serve_bench.FORM_CHOICES, default=list(serve_bench.FORM_CHOICES),
                    help="the model forms exported (on copies of the bundle) and timed")  # fmt: skip
    ap.add_argument("--image", default=None, help="the image served and explained (default: one of the test split)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=60, help="serve: requests per measurement at concurrency ≤ 4")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--serve-warmup", type=int, default=1000, help="serve: requests per server before the rounds")
    ap.add_argument("--serve-saturate", type=int, default=320, help="serve: predictions at concurrency 16 while "
                    "readiness probes are timed")  # fmt: skip
    ap.add_argument("--serve-explanations", type=int, default=4, help="serve: occlusion explanations in flight while "
                    "a lone prediction is timed")  # fmt: skip
    ap.add_argument("--serve-explain-method", default="occlusion", help="serve: those explanations' method")
    ap.add_argument("--train-root", default="data/shapes")
    ap.add_argument("--train-image-size", type=int, default=96)
    ap.add_argument("--train-num-train", type=int, default=3000)
    ap.add_argument("--train-steps", type=int, default=30)
    ap.add_argument("--train-warmup", type=int, default=5)
    ap.add_argument(
        "--train-reference-size",
        type=int,
        default=REFERENCE_SIZE,
        help="the input paths again at this size (in <train-root>-<size>px)",
    )
    ap.add_argument("--train-reference-steps", type=int, default=8, help="loop steps there (CPU training at 224 px "
                    "is slow; the loader alone runs 5x as many)")  # fmt: skip
    ap.add_argument("--predict-images", type=int, default=512, help="predict: the generated folder's JPEGs")
    ap.add_argument("--predict-batch-size", type=int, default=64)
    ap.add_argument("--out", default="bench/results.json")
    ap.add_argument("--report", default=None, help="also write the markdown tables here (make bench: docs/)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    run_dir = Path(args.run)
    if not (run_dir / "bundle").is_dir():
        raise SystemExit(f"needs a trained run ({run_dir}/bundle): make train")
    image = Path(args.image) if args.image else first_test_image(run_dir)
    result: dict = {"machine": train_bench.machine(), "versions": versions(PACKAGES)}
    result.update(train_parts(args))
    staging = tempfile.TemporaryDirectory()  # the bundle staged at 224 px and exported once, for serve and predict
    args.staging = str(Path(staging.name) / "224px")
    result.update(serve_parts(args, run_dir, image))
    print(f"[4/6] explain: each method vs its model passes, {args.rounds} rounds", flush=True)
    result["explain"] = explain_bench(run_dir / "bundle", image, args.rounds)
    for m, e in result["explain"]["methods"].items():
        print(f"  {m:22s} {e['seconds'] * 1e3:8.1f} ms vs {e['passes']:3d} {'fwd+bwd' if e['backward'] else 'fwd'} "
              f"passes {e['passes_seconds'] * 1e3:8.1f} ms   ratio {e['ratio']:.2f}")  # fmt: skip
    print(f"[5/6] predict: a folder of {args.predict_images} 640x480 JPEGs at 224 px: Trainer.predict / the forward "
          f"alone / our TorchServe at concurrency 8, {args.rounds} rounds", flush=True)  # fmt: skip
    predict_argv = ["--bundle", str(run_dir / "bundle"), "--images", str(args.predict_images), "--rounds",
                    str(args.rounds), "--batch-size", str(args.predict_batch_size), "--forms", *args.forms,
                    "--staging", args.staging]  # fmt: skip
    result["predict_224px"] = predict_bench.run(predict_bench.parser().parse_args(predict_argv))
    predict_bench.print_table(result["predict_224px"])
    print(f"[6/6] ood: a prediction with the out-of-distribution score vs without, {args.rounds} rounds", flush=True)
    result["ood"] = ood_bench(run_dir, Path(args.staging) / "run" / "bundle", image, args.rounds)
    staging.cleanup()
    print(f"  {result['ood']['method']}: {result['ood']['ms_with_score']:.2f} ms with the score, "
          f"{result['ood']['ms_without']:.2f} ms without")  # fmt: skip
    result.update(goal_keys(result))
    write_results(result, Path(args.out), args.report)
    return 0


def train_parts(args: argparse.Namespace) -> dict:
    """The training bench at the default size, then the input paths (loader alone and plain loop) at 224 px."""
    print(f"[1/6] train: ceiling / plain loop / Lightning / input paths, {args.rounds} rounds", flush=True)
    train_argv = ["--root", args.train_root, "--image-size", str(args.train_image_size), "--num-train",
                  str(args.train_num_train), "--steps", str(args.train_steps), "--warmup", str(args.train_warmup),
                  "--rounds", str(args.rounds)]  # fmt: skip
    parts = {"train": train_bench.run(train_bench.parser().parse_args(train_argv))}
    train_bench.print_table(parts["train"])
    size, steps = args.train_reference_size, args.train_reference_steps
    print(f"      the input paths at {size} px: the loader alone and the plain loop", flush=True)
    reference_argv = ["--root", f"{args.train_root}-{size}px", "--image-size", str(size), "--num-train",
                      str(args.train_num_train), "--num-val", "50", "--num-test", "50", "--contenders", "input",
                      "loop", "--steps", str(steps), "--input-steps", str(5 * steps), "--warmup", "2",
                      "--rounds", str(args.rounds)]  # fmt: skip
    parts["train_224px"] = train_bench.run(train_bench.parser().parse_args(reference_argv))
    train_bench.print_table(parts["train_224px"])
    return parts


def serve_parts(args: argparse.Namespace, run_dir: Path, image: Path) -> dict:
    """The model's forms at its own size (their checks on the run's test split, their forward pass alone), then the
    serving bench at ImageNet's 224 px with the default form."""
    bundle = run_dir / "bundle"
    print(f"[2/6] forms at the model's own size: {', '.join(args.forms) or 'none'} exported, checked and timed",
          flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        staging, records = serve_bench.exported_bundle(bundle, Path(tmp), tuple(args.forms))
        forward_ms = serve_bench.form_times(staging, records, (1, serve_bench.MODEL_CONFIG["batchSize"]), args.rounds)
        default = load_bundle(staging, runtime="auto").form
    forms = {"forms": records, "forward_ms": forward_ms, "default_form": default}
    for b in forward_ms["eager"]:
        print(f"  forward {b} ms: " + ", ".join(f"{n} {ms[b]:.1f}" for n, ms in forward_ms.items()))
    print(f"[3/6] serve at {REFERENCE_SIZE} px: in process / our TorchServe / KServe / stock TorchServe, "
          f"{args.rounds} rounds", flush=True)  # fmt: skip
    serve_argv = ["--bundle", str(bundle), "--image", str(image), "--rounds", str(args.rounds), "--requests",
                  str(args.requests), "--warmup", str(args.serve_warmup), "--image-size", str(REFERENCE_SIZE),
                  "--concurrency", *map(str, args.concurrency), "--forms", *args.forms,
                  "--staging", args.staging, "--explanations", str(args.serve_explanations),
                  "--explain-method", args.serve_explain_method,
                  "--saturate", str(args.serve_saturate)]  # fmt: skip
    serve = serve_bench.run(serve_bench.parser().parse_args(serve_argv))
    serve_bench.print_table(serve)
    return {"forms": forms, "serve_224px": serve}


def goal_keys(result: dict) -> dict:
    """The goal keys: the ratios the parts computed under these names (the 224 px serving part's with the suffix
    _224px), and those taken from the parts here; then each goal's verdict."""
    keys = {k: v for k, v in result["train"].items() if k in GOALS}
    serve = result["serve_224px"]
    keys.update({f"{k}_224px": v for k, v in serve.items() if f"{k}_224px" in GOALS})
    for key in (
        "explain.response_bytes_vs_stock",
        "serve.kserve_ready_p99_ms_saturated",
        "serve.slim_ready_seconds_vs_torch",
    ):  # as the part names them
        keys[key] = serve.get(key, math.nan)
    keys["train.cache_loader_vs_file_loader_224px"] = result["train_224px"]["train.input_vs_input_files"]
    keys["explain.ig50_vs_passes"] = result["explain"]["methods"]["integrated_gradients"]["ratio"]
    int8 = result["forms"]["forms"].get("onnx-int8", {})  # its checks at the model's own size, on the test split
    keys["forms.int8_agreement"] = int8.get("agreement", math.nan)
    keys["forms.int8_accuracy_delta_points"] = abs(int8.get("accuracy", math.nan) - int8.get("eager_accuracy", 0)) * 100
    keys["export.seconds"] = sum(r.get("seconds", 0) for r in result["forms"]["forms"].values())
    keys.update({k: v for k, v in result["predict_224px"].items() if k in GOALS})
    keys.update({k: v for k, v in result["ood"].items() if k in GOALS})
    keys.update({k: math.nan for k in GOALS if k not in keys})  # a part left out (e.g. no int8 form exported)
    found = {**result, **keys}
    keys["goals"] = {k: {"goal": g.value, "kind": g.kind, "why": g.why,
                         "met": verdict(k, found[k]).startswith("met")} for k, g in GOALS.items()}  # fmt: skip
    return keys


def write_results(result: dict, out: Path, report: str | None) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    gpu = f", {result['machine']['gpu']}" if "gpu" in result["machine"] else ""
    print(f"\n{result['machine']['cpu']}, {result['machine']['cores']} cores{gpu}; torch {torch.__version__}")
    for k in GOALS:
        print(f"  {k:40s} {result[k]:8.3f}   {verdict(k, result[k])}")
    print(f"written: {out}")
    if report:
        Path(report).write_text(markdown.markdown(result, str(out)))
        print(f"written: {report}")


def first_test_image(run_dir: Path) -> Path:
    found = sorted(run_test_images(run_dir))
    if not found:
        raise SystemExit(f"no test images for {run_dir} (test_files.txt or its data root's test/); pass --image")
    return found[0]


if __name__ == "__main__":
    sys.exit(main())
