"""Captum attributions for a bundle's model: the code the heatmap script, the quality measures and the
TorchServe handler share, so a heatmap over HTTP is the one the script draws.

Every method returns a per-pixel map (N, H, W) at the model's input size; `to_original_size` maps it
back onto the user's image (the eval transform resizes the whole image, so a plain resize inverts it).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn

from visionapp.attribution.methods import Options, check_method
from visionapp.bundle import Bundle


def target_index(class_names: Sequence[str], name: str) -> int:
    """The index of a class given by name; the error lists the valid names."""
    try:
        return list(class_names).index(name)
    except ValueError:
        raise ValueError(f"unknown class {name!r}; this model's classes are: {', '.join(class_names)}") from None


def reference(x: torch.Tensor, kind: str = "median") -> torch.Tensor:
    """The "no information" input that attributions are measured against.

    "median": each image's own per-channel median colour, a flat image of (mostly) its background, so that
    what differs from the background carries the attribution; "zero": the normalised zero image, the data
    set's mean colour (Captum's default).
    """
    if kind == "zero":
        return torch.zeros_like(x)
    if kind != "median":
        raise ValueError(f"unknown baseline {kind!r}; choose median or zero")
    return x.flatten(2).median(dim=2).values[..., None, None].expand_as(x).contiguous()


def equivalent_passes(method: str, h: int, w: int, *, ig_steps: int = 50) -> tuple[int, bool]:
    """How many model passes `attribute` makes for one image, and whether each has a backward pass: the
    floor its cost is measured against (make bench)."""
    return check_method(method).passes(h, w, Options(ig_steps=ig_steps))


def attribute(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    method: str,
    *,
    ig_steps: int = 50,
    nt_samples: int = 0,
    internal_batch_size: int = 64,
    reduce: bool = True,
    baseline: str = "median",
) -> torch.Tensor:
    """Attribution maps (N, H, W) for `target` classes of a batch `x` (normalised, N x 3 x H x W).

    Channels are summed, keeping the sign: positive is evidence for the target class. reduce=False keeps them,
    (N, 3, H, W), as captum.metrics wants; summing those over channels gives the reduced map. `baseline` picks
    the reference input (see `reference`). `internal_batch_size` bounds the memory of integrated gradients
    and occlusion (their model inputs run in chunks of this many images).
    """
    declared = check_method(method)
    options = Options(ig_steps=ig_steps, nt_samples=nt_samples, internal_batch_size=internal_batch_size)
    attr = declared.run(model, x, target, reference(x, baseline), options).detach()
    if attr.shape[1] == 1 and not reduce:  # a layer method's one map for all channels: split it so they sum to it
        return (attr / x.shape[1]).expand_as(x).contiguous()
    return attr.sum(dim=1) if reduce else attr


def to_original_size(attr_map: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Resize one (H, W) map to a PIL size (width, height): the eval transform's resize, inverted."""
    width, height = size
    up = torch.nn.functional.interpolate(attr_map[None, None].float(), size=(height, width), mode="bilinear")
    return up[0, 0].cpu().numpy()


def bounded(image: Image.Image, max_pixels: int | None) -> Image.Image:
    """`image`, shrunk to at most `max_pixels` (aspect kept) when it is bigger: what a heatmap is drawn on, so
    that drawing and encoding it costs the same for a 24-megapixel photo as for a 0.5-megapixel one."""
    width, height = image.size
    if max_pixels is None or width * height <= max_pixels:
        return image
    scale = math.sqrt(max_pixels / (width * height))
    size = (max(1, math.floor(width * scale)), max(1, math.floor(height * scale)))
    return image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)  # reduce() first: fast on huge images


def overlay_png(image: Image.Image, attr_map: np.ndarray, alpha: float = 0.55) -> bytes:
    """The positive attribution as a heat colour blended over the image, as PNG bytes (for HTTP answers)."""
    from matplotlib import colormaps

    pos = np.clip(attr_map, 0, None)
    scale = np.percentile(pos, 99) or pos.max() or 1.0  # as Captum's visualisation: clip the top 1% outliers
    heat = colormaps["jet"](np.clip(pos / scale, 0, 1))[..., :3]
    weight = alpha * np.clip(pos / scale, 0, 1)[..., None]
    base = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    blended = (base * (1 - weight) + heat * weight) * 255
    buf = io.BytesIO()
    Image.fromarray(blended.round().astype(np.uint8)).save(buf, format="PNG", compress_level=1)  # fast, ~5% larger
    return buf.getvalue()


@dataclass
class Explanation:
    image: Image.Image  # the original, upright RGB (shrunk to explain's max_pixels when given)
    attr_map: np.ndarray  # (height, width) at that image's size
    predicted: str
    probability: float  # of the predicted class
    target: str
    target_probability: float
    ood: tuple[float, bool] | None = None  # the out-of-distribution score and flag, with an OOD record in the bundle


def explain(
    bundle: Bundle,
    image: Image.Image,
    method: str,
    *,
    target: str | None = None,
    ig_steps: int = 50,
    nt_samples: int = 0,
    device: torch.device | str = "cpu",
    max_pixels: int | None = None,
) -> Explanation:
    """Attributions at the model's input size for `image` (its predicted class, or `target`); the map is resized
    onto the image, or onto a copy of at most `max_pixels` (the prediction always sees the whole image)."""
    x = bundle.transform(image)[None].to(device)
    with torch.no_grad():
        probabilities, scores, flags = bundle.answer(x)  # calibrated; the OOD score from the same forward pass
    probs = probabilities[0]
    ood = (float(scores[0]), bool(flags[0])) if scores is not None and flags is not None else None
    pred = int(probs.argmax())
    tgt = pred if target is None else target_index(bundle.class_names, target)
    amap = attribute(
        bundle.model, x, torch.tensor([tgt], device=device), method, ig_steps=ig_steps, nt_samples=nt_samples
    )[0]
    names = bundle.class_names
    shown = bounded(image, max_pixels)
    return Explanation(
        shown, to_original_size(amap, shown.size), names[pred], float(probs[pred]), names[tgt], float(probs[tgt]), ood
    )
