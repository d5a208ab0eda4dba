"""The model card every bundle carries (bundle/MODEL_CARD.md): what the model is for, what it was trained on, how
well it does and where it fails, in the format Hugging Face model cards use (YAML metadata, then sections).

Written at the end of `fit` from the run's metrics.json and config.yaml: every figure in it is metrics.json's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from visionapp.manifest import CARD_FILE


def _schedule(config: dict[str, Any]) -> str:
    """The optimizer and schedule as the composed config names them."""
    model = config.get("model", {})
    parts = []
    for key in ("optimizer", "scheduler"):
        spec = model.get(key) or {}
        if isinstance(spec, dict) and spec.get("class_path"):
            args = ", ".join(f"{k}={v}" for k, v in (spec.get("init_args") or {}).items() if v is not None)
            parts.append(f"{spec['class_path'].rsplit('.', 1)[-1]}({args})")
    thaws = [c for c in config.get("trainer", {}).get("callbacks") or [] if "Thaw" in str(c.get("class_path", ""))]
    if thaws:
        at = (thaws[0].get("init_args") or {}).get("unfreeze_backbone_at_epoch")
        parts.append(f"the head alone first, the backbone thawed at epoch {at}")
    return "; ".join(parts) or "as in config.yaml"


def _metadata(metrics: dict[str, Any]) -> dict[str, Any]:
    weights = metrics.get("pretrained_weights")
    meta: dict[str, Any] = {
        "library_name": "pytorch",
        "pipeline_tag": "image-classification",
        "tags": ["image-classification", "torchvision", metrics["arch"], "visionapp"],
        "datasets": [metrics["dataset"]],
        "metrics": ["accuracy"],
    }
    if metrics["test_acc"] is not None:  # Hugging Face's result block: the test accuracy (none when no test ran)
        meta["model-index"] = [{
            "name": f"{metrics['arch']}-{metrics['dataset']}",
            "results": [{
                "task": {"type": "image-classification"},
                "dataset": {"name": metrics["dataset"], "type": metrics["dataset"], "split": "test"},
                "metrics": [{"type": "accuracy", "value": round(metrics["test_acc"], 4)}],
            }],
        }]  # fmt: skip
    if weights:
        meta["base_model"] = f"torchvision/{metrics['arch']}.{weights}"
    return meta


def _figure(value: float | None) -> str:
    """A measured figure, or what a run that did not measure it (e.g. no validation epoch) says instead."""
    return "not measured" if value is None else f"{value:.4f}"


def _results(metrics: dict[str, Any]) -> list[str]:
    calibration, ood = metrics.get("calibration") or {}, metrics.get("ood") or {}
    lines = ["## Results", "", f"Test accuracy **{_figure(metrics['test_acc'])}** ({metrics.get('test_split')}); "
             f"validation accuracy {_figure(metrics['val_acc'])}.", "", "| class | test accuracy |",
             "|---|---|"]  # fmt: skip
    lines += [f"| {c} | {a:.4f} |" for c, a in (metrics.get("test_acc_per_class") or {}).items() if a is not None]
    if calibration:
        lines += ["", f"Calibration: expected calibration error {calibration['ece_before']:.4f} before, "
                  f"{calibration['ece_after']:.4f} after temperature scaling (temperature "
                  f"{calibration['temperature']}, fitted on the validation split)."]  # fmt: skip
    if ood:
        aurocs = ", ".join(f"{name} {ood[f'auroc_{name}']:.4f}" for name in ood.get("sets", {}))
        aurocs = aurocs or "not measured: the data has no out-of-distribution sets"
        lines += ["", f"Out of distribution: method **{ood['method']}** (chosen on {ood.get('chosen_on')}), threshold "
                  f"{ood['threshold']} (accepts {ood['accept']:.0%} of validation images); "
                  f"AUROC {aurocs}."]  # fmt: skip
    lines += ["", "Explanation quality (Captum's methods against the images' masks, where the data has them) is "
              "measured by `make explain` and shown in the run's report.html."]  # fmt: skip
    return lines


def card(metrics: dict[str, Any], config: dict[str, Any]) -> str:
    """The card's text from a run's metrics.json and composed config."""
    classes = ", ".join(metrics["class_names"])
    sizes, ood = metrics.get("split_sizes") or {}, metrics.get("ood") or {}
    split_sizes = ", ".join(f"{n} {sizes[n]} images" for n in ("train", "val", "test") if n in sizes)
    ood_sets = ", ".join(f"{k} ({v} images)" for k, v in ood.get("sets", {}).items())
    image_size = config.get("data", {}).get("init_args", {}).get("image_size", "?")
    flagged = f"{1 - ood['accept']:.0%}" if ood else "a share"
    origin = (f"torchvision's ImageNet weights `{metrics['pretrained_weights']}`" if metrics.get("pretrained")
              else f"random initialisation ({metrics.get('pretrained_reason')})")  # fmt: skip
    sections = [
        "---", yaml.safe_dump(_metadata(metrics), sort_keys=False).strip(), "---", "",
        f"# {metrics['arch']} on {metrics['dataset']}", "",
        "## Intended use", "",
        f"Sorting images into one of {metrics['num_classes']} classes: {classes}. Every answer carries an "
        "out-of-distribution score and flag: an image of none of these classes is flagged, not trusted.", "",
        "## Data", "",
        f"`{metrics['dataset']}` from `{metrics.get('data_root')}`: {split_sizes}. The test split is held out from "
        f"training and from choosing the checkpoint ({metrics.get('test_split')}); out-of-distribution sets: "
        f"{ood_sets or 'none'}.", "",
        "## Training", "",
        f"{metrics['arch']} from {origin}, a new head for the classes; {metrics['epochs']} epochs, "
        f"{metrics['global_steps']} steps on {metrics['device']} ({metrics['precision']}, {metrics['world_size']} "
        f"process(es)); {_schedule(config)}. The bundle holds the best epoch by validation accuracy.", "",
        *_results(metrics), "",
        "## Limitations", "",
        "- Measured on images like the training data only; photos from elsewhere (other cameras, light, framing) "
        "can score lower than the test split says.",
        f"- The model sees images resized to {image_size} px: detail smaller than that is lost.",
        "- The out-of-distribution score catches images unlike the training data as a whole; an image close to a "
        f"class it knows can pass, and by design {flagged} of in-distribution images are flagged.",
        "",
        "## Versions", "",
        *(f"- {k} {v}" for k, v in (metrics.get("versions") or {}).items()),
        "",
    ]  # fmt: skip
    return "\n".join(sections)


def write_card(bundle_dir: Path, metrics: dict[str, Any], config_file: Path) -> Path:
    config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else {}
    out = bundle_dir / CARD_FILE
    out.write_text(card(metrics, config or {}))
    return out
