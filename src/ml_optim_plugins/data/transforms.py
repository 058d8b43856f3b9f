"""Image preprocessing from the image encoder's timm data config (size, interpolation, mean, std, crop).

A pretrained network expects its inputs prepared as in its pretraining: ``tf_efficientnet_lite0`` wants bicubic resizes
and ``(x - 0.5) / 0.5``, a torchvision ResNet ImageNet statistics. timm records this per architecture; the data modules
take the architecture's name (``image_model``) and build their transforms with timm's own factory, so the data never
hard-codes statistics and never imports the model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from timm.data import create_transform, resolve_data_config

# Random resized crops keep at least 60% of the image: timm's ImageNet default (8%) is meant for training from scratch
# and crops away the content of a small finetuning set.
TRAIN_CROP_SCALE = (0.6, 1.0)


def image_data_config(image_model: str | None = None, image_size: int | None = None) -> dict[str, Any]:
    """timm's data config of architecture ``image_model`` (timm's ImageNet defaults when ``None``), with its input
    size replaced by ``image_size`` when given.

    Args:
        image_model: a name of ``timm.list_models()``, normally the image encoder's ``model_name``.
        image_size: side of the square inputs; ``None`` keeps the architecture's own.

    Returns:
        ``{"input_size": (3, H, W), "interpolation", "mean", "std", "crop_pct", "crop_mode"}``.

    Raises:
        ValueError: for an unknown architecture or a non-positive ``image_size``.

    Example:
        >>> config = image_data_config("tf_efficientnet_lite0")
        >>> config["input_size"], config["interpolation"], config["mean"]
        ((3, 224, 224), 'bicubic', (0.5, 0.5, 0.5))
        >>> image_data_config(None, image_size=64)["mean"]
        (0.485, 0.456, 0.406)
    """
    import timm

    if image_size is not None and image_size <= 0:
        raise ValueError(f"image_size={image_size} must be positive")
    if image_model is None:
        config = resolve_data_config(args={"input_size": (3, 224, 224)})
    else:
        if not timm.is_model(image_model):
            raise ValueError(f"image_model={image_model!r} is not a timm architecture; give the image encoder's model_name")
        pretrained_cfg = timm.get_pretrained_cfg(image_model)
        config = resolve_data_config(pretrained_cfg=pretrained_cfg.to_dict() if pretrained_cfg else {"architecture": image_model})
    if image_size is not None:
        config["input_size"] = (3, image_size, image_size)
    return config


def image_transform(config: Mapping[str, Any], train: bool, augment: bool = True) -> Callable[..., Any]:
    """The PIL-image-to-tensor transform of ``config``: for training with ``augment``, random resized crops (60-100% of
    the image) and horizontal flips; otherwise timm's evaluation resize and center crop (``crop_pct``).

    Example:
        >>> from PIL import Image
        >>> transform = image_transform(image_data_config("tf_efficientnet_lite0", image_size=32), train=False)
        >>> transform(Image.new("RGB", (50, 40), (255, 255, 255))).shape, float(transform(Image.new("RGB", (8, 8))).min())
        (torch.Size([3, 32, 32]), -1.0)
    """
    if train and augment:
        return create_transform(
            config["input_size"],
            is_training=True,
            scale=TRAIN_CROP_SCALE,
            color_jitter=0.0,
            interpolation=config["interpolation"],
            mean=config["mean"],
            std=config["std"],
        )
    return create_transform(**config, is_training=False)
