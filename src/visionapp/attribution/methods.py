"""The attribution methods, each declared once: its Captum class, how it is called, its layer (if any) and the
model passes it costs. The heatmap script, the quality measures, the TorchServe handler and the bench all read
METHODS; adding a method here adds it everywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from captum.attr import GradientShap, IntegratedGradients, LayerAttribution, LayerGradCam, NoiseTunnel, Occlusion
from torch import nn

GRADIENT_SHAP_SAMPLES = 16


@dataclass(frozen=True)
class Options:
    """Per-call settings a method may read."""

    ig_steps: int = 50
    nt_samples: int = 0  # integrated gradients: NoiseTunnel (SmoothGrad) samples; 0 = off
    internal_batch_size: int = 64  # model inputs per forward, bounding memory


@dataclass(frozen=True)
class Method:
    """How to run one Captum method on a batch, and what it costs for one image."""

    captum_class: type
    # (model, x, target, baseline, options) → attributions (N, C, H, W), or (N, 1, H, W) for a layer method
    run: Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, Options], torch.Tensor]
    # (height, width, options) → (model passes for one image, whether each has a backward pass)
    passes: Callable[[int, int, Options], tuple[int, bool]]
    layer: Callable[[nn.Module], nn.Module] | None = None  # for a layer method: which layer it reads


def gradcam_layer(model: nn.Module) -> nn.Module:
    """A late convolutional stage: resnet's layer4, or the last block of `features` (mobilenet, efficientnet,
    convnext, densenet, vgg...)."""
    if isinstance(getattr(model, "layer4", None), nn.Module):
        return model.get_submodule("layer4")
    features = getattr(model, "features", None)
    if isinstance(features, nn.Sequential):
        return features[-1]
    raise ValueError(
        f"layer_gradcam needs a convolutional stage; {type(model).__name__} has none we know of. "
        "Use integrated_gradients, gradient_shap or occlusion"
    )


def occlusion_window(size: int) -> tuple[int, int]:
    """Occlusion's square window and stride for an image side: an eighth of the image, half-window steps."""
    return max(4, size // 8), max(2, size // 16)


def _integrated_gradients(model, x, target, base, o: Options) -> torch.Tensor:
    ig = IntegratedGradients(model)
    if o.nt_samples:
        return NoiseTunnel(ig).attribute(
            x,
            baselines=base,
            nt_type="smoothgrad",
            nt_samples=o.nt_samples,
            stdevs=0.15,
            nt_samples_batch_size=1,
            target=target,
            n_steps=o.ig_steps,
            internal_batch_size=o.internal_batch_size,
        )
    return ig.attribute(x, baselines=base, target=target, n_steps=o.ig_steps, internal_batch_size=o.internal_batch_size)


def _gradient_shap(model, x, target, base, o: Options) -> torch.Tensor:
    # Baselines drawn around each image's own reference, one image at a time. GradientShap draws from torch's and
    # numpy's global generators (its noise, its points between baseline and input), so the call runs on forked,
    # seeded ones: the same image gives the same map whatever ran before, and the caller's streams are left as
    # they were.
    gs = GradientShap(model)
    numpy_state = np.random.get_state()
    np.random.seed(0)
    try:
        with torch.random.fork_rng(devices=[x.device.index or 0] if x.is_cuda else []):
            torch.manual_seed(0)
            noise = torch.randn((8, *x.shape[1:])).to(x) * 0.1
            return torch.cat(
                [
                    gs.attribute(
                        x[i : i + 1],
                        baselines=base[i : i + 1] + noise,
                        n_samples=GRADIENT_SHAP_SAMPLES,
                        stdevs=0.1,
                        target=target[i : i + 1],
                    )
                    for i in range(len(x))
                ]
            )
    finally:
        np.random.set_state(numpy_state)


def _occlusion(model, x, target, base, o: Options) -> torch.Tensor:
    win, stride = occlusion_window(x.shape[-2])
    return Occlusion(model).attribute(
        x,
        sliding_window_shapes=(3, win, win),
        strides=(3, stride, stride),
        baselines=base,
        target=target,
        perturbations_per_eval=o.internal_batch_size,
    )


def _layer_gradcam(model, x, target, base, o: Options) -> torch.Tensor:
    cam = LayerGradCam(model, gradcam_layer(model)).attribute(x, target=target, relu_attributions=True)
    return LayerAttribution.interpolate(cam, tuple(x.shape[-2:]), interpolate_mode="bilinear")


def _occlusion_passes(h: int, w: int, o: Options) -> tuple[int, bool]:
    win, stride = occlusion_window(h)
    return 1 + ((h - win) // stride + 1) * ((w - win) // stride + 1), False  # + the unoccluded forward


METHODS: dict[str, Method] = {
    "integrated_gradients": Method(IntegratedGradients, _integrated_gradients, lambda h, w, o: (o.ig_steps, True)),
    "gradient_shap": Method(GradientShap, _gradient_shap, lambda h, w, o: (GRADIENT_SHAP_SAMPLES, True)),
    "occlusion": Method(Occlusion, _occlusion, _occlusion_passes),
    "layer_gradcam": Method(LayerGradCam, _layer_gradcam, lambda h, w, o: (1, True), layer=gradcam_layer),
}


def check_method(name: str) -> Method:
    """The declaration of `name`; the error lists every method there is."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]
