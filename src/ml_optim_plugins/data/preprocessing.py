"""How inputs are prepared for a model, as plain data that travels in a checkpoint: the image transform's timm data
config, the tokenizer and the longest text.

A data module describes its own preparation (:attr:`~ml_optim_plugins.MultimodalDataModule.preprocessing`);
LightningCLI saves it in the model's hyperparameters, so a checkpoint alone can prepare new images and texts
(:class:`~ml_optim_plugins.Predictor`), and a data module that prepares them differently is refused at ``predict``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ml_optim_plugins.data.collate import MultimodalCollate, load_tokenizer
from ml_optim_plugins.data.transforms import image_transform

IMAGE_CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


def _plain(value: Any) -> Any:
    """``value`` with tuples as lists, so it reads the same from YAML, from a checkpoint and from a live config."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def describe_preprocessing(
    image_config: Mapping[str, Any] | None, tokenizer: str | None, max_length: int
) -> dict[str, Any]:
    """The plain-data description of a data module's evaluation pipeline.

    Args:
        image_config: timm data config of the evaluation image transform (``input_size``, ``interpolation``, ``mean``,
            ``std``, ``crop_pct``, ``crop_mode``); ``None`` for data that has no image files.
        tokenizer: the text model whose tokenizer makes the tokens, or ``None`` (raw strings).
        max_length: longest tokenised text.

    Returns:
        ``{"image": {...} | None, "tokenizer": str | None, "max_length": int}``, lists instead of tuples.

    Example:
        >>> from ml_optim_plugins.data.transforms import image_data_config
        >>> described = describe_preprocessing(image_data_config("tf_efficientnet_lite0"), "all-MiniLM-L6-v2", 64)
        >>> described["image"]["input_size"], described["image"]["mean"], described["max_length"]
        ([3, 224, 224], [0.5, 0.5, 0.5], 64)
    """
    image = None if image_config is None else {key: _plain(image_config[key]) for key in IMAGE_CONFIG_KEYS}
    return {"image": image, "tokenizer": tokenizer, "max_length": int(max_length)}


def preprocessing_pipeline(preprocessing: Mapping[str, Any]) -> tuple[Callable[..., Any], MultimodalCollate]:
    """The image transform (PIL image to tensor) and the batch collate function that ``preprocessing`` describes.

    Raises:
        ValueError: when ``preprocessing`` is not a description of :func:`describe_preprocessing`, or has no image
            transform.

    Example:
        >>> from PIL import Image
        >>> transform, collate = preprocessing_pipeline(
        ...     {"image": {"input_size": [3, 32, 32], "interpolation": "bilinear", "mean": [0.0] * 3, "std": [1.0] * 3,
        ...                "crop_pct": 1.0, "crop_mode": "center"}, "tokenizer": None, "max_length": 16})
        >>> batch = collate([{"image": transform(Image.new("RGB", (48, 40))), "text": "so good"}])
        >>> batch["image"].shape, batch["text"]
        (torch.Size([1, 3, 32, 32]), ['so good'])
    """
    missing = [key for key in ("image", "tokenizer", "max_length") if key not in preprocessing]
    if missing:
        raise ValueError(
            f"preprocessing {dict(preprocessing)!r} lacks {missing}; give a data module's .preprocessing "
            "({'image': timm data config, 'tokenizer': name or None, 'max_length': int})"
        )
    image = preprocessing["image"]
    if image is None:
        raise ValueError("preprocessing has no image transform (image: None); the data it describes has no image files")
    config = {key: tuple(value) if isinstance(value, list) else value for key, value in image.items()}
    tokenizer = preprocessing["tokenizer"]
    collate = MultimodalCollate(None if tokenizer is None else load_tokenizer(tokenizer), int(preprocessing["max_length"]))
    return image_transform(config, train=False), collate


def preprocessing_differences(expected: Mapping[str, Any], given: Mapping[str, Any]) -> list[str]:
    """What differs between two descriptions, one ``"key: expected vs given"`` entry per differing setting.

    Example:
        >>> a = {"image": {"input_size": [3, 32, 32], "mean": [0.5] * 3}, "tokenizer": "t", "max_length": 24}
        >>> preprocessing_differences(a, {**a, "image": {"input_size": [3, 64, 64], "mean": [0.5] * 3}})
        ['image input_size: [3, 32, 32] vs [3, 64, 64]']
    """
    expected, given = _plain(expected), _plain(given)
    differences = []
    for key in sorted(set(expected) | set(given)):
        want, have = expected.get(key), given.get(key)
        if isinstance(want, dict) and isinstance(have, dict):
            differences += [
                f"{key} {inner}: {want.get(inner)} vs {have.get(inner)}"
                for inner in sorted(set(want) | set(have))
                if want.get(inner) != have.get(inner)
            ]
        elif want != have:
            differences.append(f"{key}: {want} vs {have}")
    return differences
