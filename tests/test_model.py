import logging
from pathlib import Path

import pytest
import torch
from torchvision.models import get_model, get_model_weights

from visionapp.train.model import backbone_modules, build_model, classifier_head


@pytest.mark.parametrize(
    ("arch", "size"),
    [("resnet18", 64), ("mobilenet_v3_small", 64), ("efficientnet_b0", 64), ("convnext_tiny", 64), ("vit_b_16", 64)],
)
def test_each_family_builds_with_our_head(arch: str, size: int) -> None:
    model, info = build_model(arch, 7, weights=None, image_size=size)
    assert not info.pretrained
    head = classifier_head(model)
    assert getattr(head, "out_features", getattr(head, "out_channels", None)) == 7
    assert all(head is not m for b in backbone_modules(model) for m in b.modules())
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, size, size)).shape == (2, 7)


def test_unknown_arch_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match="resnet18"):
        build_model("resnet19", 3)


def _cache_fake_imagenet_weights(torch_home: Path) -> dict[str, torch.Tensor]:
    """A resnet18 ImageNet-shaped state_dict, put where torchvision's download would cache it."""
    torch.manual_seed(123)
    state = get_model("resnet18", weights=None).state_dict()
    url = get_model_weights("resnet18")["DEFAULT"].url
    path = torch_home / "hub" / "checkpoints" / url.rsplit("/", 1)[1]
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    return state


def test_default_weights_load_from_the_torch_home_cache(torch_home: Path, offline: None) -> None:
    state = _cache_fake_imagenet_weights(torch_home)
    model, info = build_model("resnet18", 4, weights="DEFAULT")
    assert info.pretrained and info.weights == "ResNet18_Weights.IMAGENET1K_V1"
    assert torch.equal(model.state_dict()["layer1.0.conv1.weight"], state["layer1.0.conv1.weight"])
    assert model.fc.out_features == 4  # the 1000-class head was skipped, ours is fresh


def test_weights_file_option(tmp_path: Path) -> None:
    torch.manual_seed(5)
    state = get_model("resnet18", weights=None).state_dict()
    torch.save(state, tmp_path / "backbone.pth")
    model, info = build_model("resnet18", 3, weights=None, weights_file=str(tmp_path / "backbone.pth"))
    assert info.pretrained and info.weights == str(tmp_path / "backbone.pth")
    assert torch.equal(model.state_dict()["conv1.weight"], state["conv1.weight"])
    with pytest.raises(FileNotFoundError, match=r"missing\.pth"):
        build_model("resnet18", 3, weights_file=str(tmp_path / "missing.pth"))


def test_offline_falls_back_to_random_init_with_a_warning(
    torch_home: Path, offline: None, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        _model, info = build_model("resnet18", 3, weights="DEFAULT")
    cached = torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert not info.pretrained and str(cached) in info.reason
    assert any(r.levelno == logging.WARNING and str(cached) in r.getMessage() for r in caplog.records)


def test_require_pretrained_turns_the_fallback_into_an_error(torch_home: Path, offline: None) -> None:
    with pytest.raises(RuntimeError, match="require_pretrained"):
        build_model("resnet18", 3, weights="DEFAULT", require_pretrained=True)


def test_unknown_weights_name_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match="IMAGENET1K_V1"):
        build_model("resnet18", 3, weights="IMAGENET22K")
