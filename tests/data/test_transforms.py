"""Image transforms come from the image encoder's timm data config; augmentation only for training."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from ml_optim_plugins import SyntheticSentimentDataModule
from ml_optim_plugins.data.transforms import TRAIN_CROP_SCALE, image_data_config, image_transform

WHITE = Image.new("RGB", (40, 30), (255, 255, 255))


@pytest.mark.parametrize(
    ("image_model", "expected_white"),
    [("tf_efficientnet_lite0", (1.0, 1.0, 1.0)), (None, tuple((1 - m) / s for m, s in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))))],
)
def test_mean_and_std_come_from_the_architecture(image_model, expected_white):
    out = image_transform(image_data_config(image_model, image_size=16), train=False)(WHITE)
    assert out.shape == (3, 16, 16)
    assert torch.allclose(out.mean(dim=(1, 2)), torch.tensor(expected_white), atol=1e-5)


def test_size_and_interpolation_come_from_the_architecture_unless_overridden():
    assert image_data_config("tf_efficientnet_lite0")["input_size"] == (3, 224, 224)
    assert image_data_config("test_resnet")["input_size"] == (3, 160, 160)
    assert image_data_config("test_resnet")["interpolation"] == "bilinear"
    assert image_data_config("test_resnet", image_size=48)["input_size"] == (3, 48, 48)


def test_evaluation_is_deterministic_and_training_augments():
    config = image_data_config("tf_efficientnet_lite0", image_size=24)
    gradient = Image.fromarray((torch.arange(64 * 48 * 3) % 251).reshape(48, 64, 3).to(torch.uint8).numpy())
    evaluation = image_transform(config, train=False)
    assert torch.equal(evaluation(gradient), evaluation(gradient))
    torch.manual_seed(0)
    training = image_transform(config, train=True)
    assert not torch.equal(training(gradient), training(gradient))
    assert any(getattr(t, "scale", None) == TRAIN_CROP_SCALE for t in training.transforms)
    off = image_transform(config, train=True, augment=False)
    assert torch.equal(off(gradient), evaluation(gradient))


@pytest.mark.parametrize(("model", "size"), [("unknown_net", None), ("tf_efficientnet_lite0", 0)])
def test_bad_image_model_or_size_is_named(model, size):
    with pytest.raises(ValueError, match="unknown_net|image_size=0"):
        image_data_config(model, size)


def test_synthetic_images_are_normalised_for_the_image_model():
    common = dict(train_size=4, val_size=2, test_size=2, image_size=32, tokenizer=None)
    raw = SyntheticSentimentDataModule(**common)
    lite = SyntheticSentimentDataModule(image_model="tf_efficientnet_lite0", **common)
    raw.setup("fit"), lite.setup("fit")
    assert torch.allclose(lite.datasets["train"][1]["image"], (raw.datasets["train"][1]["image"] - 0.5) / 0.5)
    sized = SyntheticSentimentDataModule(image_model="tf_efficientnet_lite0", **{**common, "image_size": None})
    sized.setup("fit")
    assert sized.datasets["train"][0]["image"].shape == (3, 224, 224)
    with pytest.raises(ValueError, match="image_size=None"):
        SyntheticSentimentDataModule(**{**common, "image_size": None})


def test_manifest_images_use_the_model_config(tmp_path):
    from ml_optim_plugins import ManifestDataModule

    rows = ["image,text,label"]
    for i in range(6):
        WHITE.save(tmp_path / f"{i}.jpg")
        rows.append(f"{i}.jpg,text {i},{'ab'[i % 2]}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    dm = ManifestDataModule(str(tmp_path / "m.csv"), image_model="tf_efficientnet_lite0", image_size=16, augment=False,
                            tokenizer=None, val_fraction=0.34)
    dm.setup("fit")
    image = dm.datasets["val"][0]["image"]
    assert image.shape == (3, 16, 16) and torch.allclose(image, torch.ones_like(image), atol=0.02)
