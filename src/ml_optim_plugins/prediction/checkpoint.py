"""Does a checkpoint fit the data it is asked to predict on? Its label names and preprocessing against the data
module's."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ml_optim_plugins.data.base import MultimodalDataModule
from ml_optim_plugins.data.preprocessing import preprocessing_differences


def checkpoint_mismatches(
    hparams: Mapping[str, Any], data: MultimodalDataModule, source: str = "the checkpoint"
) -> list[str]:
    """How a model with hyperparameters ``hparams`` (a checkpoint's, or ``source``'s) disagrees with ``data``: other
    label names (or another number of classes where the names were not saved), or inputs prepared otherwise (image
    size, normalisation, interpolation, crop, tokenizer, longest text). Empty when they fit.

    Example:
        >>> from ml_optim_plugins import SyntheticSentimentDataModule
        >>> data = SyntheticSentimentDataModule(image_size=32, max_length=24)
        >>> checkpoint_mismatches({"class_names": ["negative", "neutral", "positive"],
        ...                        "preprocessing": data.preprocessing}, data)
        []
        >>> checkpoint_mismatches({"class_names": ["neg", "neu", "pos"],
        ...                        "preprocessing": {**data.preprocessing, "max_length": 64}}, data)
        ["labels ['neg', 'neu', 'pos'] in the checkpoint, ['negative', 'neutral', 'positive'] in the data", \
'preprocessing (checkpoint vs data): max_length: 64 vs 24']
    """
    problems = []
    names = [str(name) for name in data.class_names]
    saved = hparams.get("class_names")
    if saved is not None and [str(name) for name in saved] != names:
        problems.append(f"labels {[str(name) for name in saved]} in {source}, {names} in the data")
    elif saved is None and hparams.get("num_classes") not in (None, len(names)):
        problems.append(f"{hparams['num_classes']} classes in {source}, {len(names)} ({names}) in the data")
    preprocessing = hparams.get("preprocessing")
    if preprocessing is not None:
        differences = preprocessing_differences(preprocessing, data.preprocessing)
        if differences:
            problems.append(f"preprocessing ({source.removeprefix('the ')} vs data): " + "; ".join(differences))
    return problems


def check_checkpoint_fits(checkpoint_path: str | Path, data: MultimodalDataModule) -> None:
    """Refuse to predict on ``data`` with a checkpoint trained with other label names or another preprocessing
    (:func:`checkpoint_mismatches`): its predictions would be silently wrong.

    Raises:
        ValueError: naming the checkpoint, the data it was trained on, each mismatch, and the config to use instead.
    """
    path = Path(checkpoint_path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    problems = checkpoint_mismatches(checkpoint.get("hyper_parameters", {}), data)
    if not problems:
        return
    trained_on = checkpoint.get("datamodule_hyper_parameters", {}).get("_class_path", "other data")
    config = path.resolve().parent.parent / "config.yaml"
    use = f"-c {config}, the config of its run," if config.is_file() else "the recipe it was trained with"
    raise ValueError(
        f"checkpoint {str(path)!r} (trained on {trained_on}) does not fit this config's data "
        f"({type(data).__name__}): {'; '.join(problems)}. Predict with {use} or with a checkpoint trained on this data"
    )
