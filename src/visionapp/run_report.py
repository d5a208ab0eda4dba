"""The run report: one self-contained HTML page to look at a run (images inlined, no other files needed).

    python -m visionapp.run_report --run runs/latest      (make report; written by fit, refreshed by make explain)

Metrics, calibration (the reliability diagram before/after), the out-of-distribution scores, the confusion matrix
and per-class accuracy, the most confident mistakes of the test split with their Grad-CAM heatmaps, the data, the
versions and the config that ran; the explanation quality table when `make explain` has measured it. Built from
the run directory and its bundle only.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
from pathlib import Path

import torch

from visionapp.attribution.maps import explain, overlay_png
from visionapp.bundle import load_bundle, run_test_images
from visionapp.decode import load_image
from visionapp.errors import UserError, run_main
from visionapp.manifest import CARD_FILE, check_complete

MISTAKES = 6
HEATMAP_PIXELS = 250_000  # the mistakes' overlays, shown 220 px wide: no need for the photo's full size


def _img(data: bytes, alt: str, width: int | None = None) -> str:
    size = f' width="{width}"' if width else ""
    return f'<img alt="{html.escape(alt)}"{size} src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _table(rows: list[tuple[str, str]]) -> str:
    return "<table>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{v}</td></tr>" for k, v in rows) + "</table>"


def confident_mistakes(run: Path, n: int = MISTAKES) -> list[dict]:
    """The test images the model got wrong with the highest (calibrated) confidence, with a heatmap of why."""
    files = run_test_images(run)
    if not files:
        return []
    bundle = load_bundle(run / "bundle")
    files = [f for f in files if f.parent.name in bundle.class_names]  # labelled by their class folder
    labels = [bundle.class_names.index(f.parent.name) for f in files]
    probs = []
    with torch.no_grad():
        for i in range(0, len(files), 64):
            x = torch.stack([bundle.transform(load_image(f)) for f in files[i : i + 64]])
            probs.append(bundle.probabilities(x))
    p = torch.cat(probs)
    conf, pred = p.max(1)
    wrong = [i for i in conf.argsort(descending=True).tolist() if pred[i] != labels[i]][:n]
    out = []
    for i in wrong:
        e = explain(bundle, load_image(files[i]), "layer_gradcam", max_pixels=HEATMAP_PIXELS)  # one backward pass
        out.append({"file": str(files[i]), "truth": bundle.class_names[labels[i]], "predicted": e.predicted,
                    "probability": e.probability, "heatmap": overlay_png(e.image, e.attr_map)})  # fmt: skip
    return out


def _png(path: Path) -> bytes | None:
    return path.read_bytes() if path.is_file() else None


def build(run: Path) -> Path:
    """Write run/report.html from the run directory and its bundle; returns its path."""
    run = Path(run)
    check_complete(run / "bundle")
    if not (run / "metrics.json").is_file():
        raise UserError(f"{run} is not a run folder (no metrics.json); train first (make train) or pass runs/<name>")
    metrics = json.loads((run / "metrics.json").read_text())
    meta = json.loads((run / "bundle" / "model.json").read_text())
    parts = [f"<h1>Run {html.escape(run.resolve().name)}</h1>", metrics_section(metrics, meta)]
    if (run / "bundle" / CARD_FILE).is_file():  # what the model is for and where it fails, with the bundle
        parts.insert(1, f"<p>Model card: <a href='bundle/{CARD_FILE}'>bundle/{CARD_FILE}</a></p>")
    parts += calibration_section(run, metrics) + ood_section(run, metrics) + per_class_section(run, metrics)
    parts += mistakes_section(run)
    parts += quality_section(run) + versions_and_config_section(run, metrics)
    style = (
        "body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222} "
        "table{border-collapse:collapse;margin:.5em 0} th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left} "
        "figure{display:inline-block;margin:.4em;width:220px;vertical-align:top} figcaption{font-size:.8em} "
        "pre{background:#f6f6f6;padding:1em;overflow:auto;font-size:.8em}"
    )
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(run.resolve().name)}</title>"
    page += f"<style>{style}</style></head><body>{''.join(parts)}</body></html>"
    out = run / "report.html"
    out.write_text(page)
    return out


def metrics_section(metrics: dict, meta: dict) -> str:
    return "<h2>Metrics</h2>" + _table([
        ("architecture", html.escape(metrics["arch"])),
        ("data", html.escape(f"{metrics['dataset']} ({metrics.get('data_root')})")),
        ("test split", html.escape(str(metrics.get("test_split")))),
        ("test accuracy", f"<b>{metrics['test_acc']:.4f}</b>"),
        ("validation accuracy", f"{metrics['val_acc']:.4f}" if metrics.get("val_acc") is not None else "—"),
        ("pretrained", html.escape(f"{metrics['pretrained']} ({metrics.get('pretrained_reason') or ''})")),
        ("epochs, wall time", f"{metrics['epochs']}, {metrics['wall_seconds']} s on {html.escape(metrics['device'])}"),
        ("image size", f"{meta['image_size']} px"),
    ])  # fmt: skip


def calibration_section(run: Path, metrics: dict) -> list[str]:
    cal = metrics.get("calibration") or {}
    if not cal:
        return []
    parts = ["<h2>Calibration</h2>" + _table([
        ("temperature (fitted on val)", f"{cal['temperature']}"),
        ("expected calibration error (test, 15 bins)", f"{cal['ece_before']:.4f} → <b>{cal['ece_after']:.4f}</b>"),
        ("negative log-likelihood (test)", f"{cal['nll_before']:.4f} → {cal['nll_after']:.4f}"),
    ])]  # fmt: skip
    if reliability := _png(run / "reliability.png"):
        parts.append(_img(reliability, "reliability diagram before and after temperature scaling", 900))
    return parts


def ood_section(run: Path, metrics: dict) -> list[str]:
    """The out-of-distribution scores side by side, the served one's threshold and its histogram."""
    ood = metrics.get("ood") or {}
    if not ood:
        return []
    sets = list(ood.get("sets", {}))
    parts = ["<h2>Out of distribution</h2>" + _table([
        ("served score, threshold", html.escape(f"{ood['method']} (chosen on {ood['chosen_on']}), "
                                               f"{ood['threshold']:g}: {ood['accept']:.0%} of validation accepted")),
        ("test images accepted", f"{ood['test_accepted']:.1%}"),
        *((f"flagged: {name} ({ood['sets'][name]} images)", f"{ood['flagged'][name]:.1%}") for name in sets),
    ])]  # fmt: skip
    keys = [f"{kind}_{name}" for name in sets for kind in ("auroc", "fpr_at_95tpr")]
    rows = "".join(f"<tr><th>{html.escape(m)}</th>" + "".join(f"<td>{row.get(k, float('nan')):.3f}</td>" for k in keys)
                   + "</tr>" for m, row in ood["methods"].items())  # fmt: skip
    parts.append("<table><tr><th>method</th>" + "".join(f"<th>{k}</th>" for k in keys) + f"</tr>{rows}</table>")
    if histogram := _png(run / "ood.png"):
        parts.append(_img(histogram, "out-of-distribution scores: in-distribution test images against each set", 800))
    return parts


def per_class_section(run: Path, metrics: dict) -> list[str]:
    per_class = metrics.get("test_acc_per_class") or {}
    parts = ["<h2>Per class</h2>" + _table([(c, f"{a:.3f}" if a is not None else "—") for c, a in per_class.items()])]
    if confusion := _png(run / "confusion_matrix.png"):
        parts.append(_img(confusion, "confusion matrix of the test split", 600))
    return parts


def mistakes_section(run: Path) -> list[str]:
    mistakes = confident_mistakes(run)
    parts = ["<h2>Most confident mistakes (test split, Grad-CAM)</h2>"]
    if not mistakes:
        parts.append("<p>None: every test image is right, or the run lists no test files (a torchvision set).</p>")
    for m in mistakes:
        caption = f"{Path(m['file']).name}: is {m['truth']}, predicted {m['predicted']} ({m['probability']:.1%})"
        parts.append(
            f"<figure>{_img(m['heatmap'], caption, 220)}<figcaption>{html.escape(caption)}</figcaption></figure>"
        )
    return parts


def quality_section(run: Path) -> list[str]:
    """make explain's table, when it has measured the run."""
    quality = run / "explanations" / "quality.json"
    if not quality.is_file():
        return []
    q = json.loads(quality.read_text())
    keys = list(next(iter(q["methods"].values())))

    def cell(v: object) -> str:
        return "—" if v is None else html.escape(f"{v:.3g}" if isinstance(v, float) else str(v))

    rows = "".join(
        f"<tr><th>{m}</th>" + "".join(f"<td>{cell(e[k])}</td>" for k in keys) + "</tr>" for m, e in q["methods"].items()
    )
    return [f"<h2>Explanation quality ({q['samples']} test images)</h2><table><tr><th></th>"
            + "".join(f"<th>{k}</th>" for k in keys) + f"</tr>{rows}</table>"]  # fmt: skip


def versions_and_config_section(run: Path, metrics: dict) -> list[str]:
    parts = ["<h2>Versions</h2>" + _table([(k, html.escape(v)) for k, v in metrics.get("versions", {}).items()])]
    config = run / "config.yaml"
    if config.is_file():
        parts.append(f"<h2>Config that ran</h2><pre>{html.escape(config.read_text())}</pre>")
    return parts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/latest")
    args = ap.parse_args(argv)
    print(f"written: {build(Path(args.run))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
