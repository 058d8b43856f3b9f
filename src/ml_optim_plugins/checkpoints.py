"""Checkpoints bound to their configuration: a checkpoint is only used with the model and data configuration it was
saved with (:func:`check_checkpoint_config`), unless the caller asks for another one explicitly."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

# Settings that change how a run is executed, or what it predicts on, not what it trains or evaluates on.
IGNORED_DATA_KEYS = frozenset({"num_workers", "predict"})
_BOOKKEEPING = frozenset({"_instantiator"})
_ABSENT = "(absent)"


def _flatten(config: Any, prefix: str, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(config, Mapping):
        for key, value in config.items():
            if key not in _BOOKKEEPING:
                _flatten(value, f"{prefix}.{key}" if prefix else str(key), out)
    elif isinstance(config, (list, tuple)) and any(isinstance(item, Mapping) for item in config):
        for index, value in enumerate(config):
            _flatten(value, f"{prefix}[{index}]", out)
    else:
        out[prefix] = list(config) if isinstance(config, tuple) else config
    return out


def config_differences(
    saved: Mapping[str, Any], current: Mapping[str, Any], ignore: Iterable[str] = ()
) -> list[tuple[str, Any, Any]]:
    """The settings in which two (nested) configurations differ, as ``(dotted key, saved value, current value)``,
    with ``"(absent)"`` for a key one side lacks; tuples and lists compare equal. ``ignore`` names settings (and
    everything below them) left out.

    Example:
        >>> config_differences({"lr": 0.1, "fusion": {"dropout": 0.2}}, {"lr": 0.1, "fusion": {"dropout": 0.5}})
        [('fusion.dropout', 0.2, 0.5)]
    """
    left, right = _flatten(saved, "", {}), _flatten(current, "", {})
    ignored = tuple(ignore)
    keys = sorted(
        key
        for key in left.keys() | right.keys()
        if not any(key == prefix or key.startswith((f"{prefix}.", f"{prefix}[")) for prefix in ignored)
    )
    return [
        (key, left.get(key, _ABSENT), right.get(key, _ABSENT))
        for key in keys
        if left.get(key, _ABSENT) != right.get(key, _ABSENT)
    ]


def model_config_from_hparams(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's saved ``hyper_parameters`` (LightningCLI's ``_class_path`` plus the init arguments) in the shape
    of a parsed ``model`` config: ``{"class_path": ..., "init_args": {...}}``."""
    init_args = {key: value for key, value in hparams.items() if key not in ("_class_path", *_BOOKKEEPING)}
    if "_class_path" not in hparams:
        return {"init_args": init_args}
    return {"class_path": hparams["_class_path"], "init_args": init_args}


def _shown(value: Any, width: int = 70) -> str:
    text = repr(value) if value is not _ABSENT else value
    return text if len(text) <= width else text[: width - 3] + "..."


def check_checkpoint_config(
    ckpt_path: str | Path,
    model_hparams: Mapping[str, Any] | None,
    data_hparams: Mapping[str, Any] | None = None,
    override_flag: str = "--allow_config_change true",
    model_ignore: Iterable[str] = (),
    data_ignore: Iterable[str] = IGNORED_DATA_KEYS,
) -> None:
    """Refuse a checkpoint saved with another model or data configuration than the run about to use it.

    A checkpoint's weights silently replace the model's: testing the image-only pretraining checkpoint under the
    quick-start config, or resuming a ConcatFusion run with a GatedFusion config, would report or continue another
    model than the config says. The saved ``hyper_parameters`` and ``datamodule_hyper_parameters`` (which LightningCLI
    and ``save_hyperparameters`` write) are compared with the run's, setting by setting.
    ``num_workers`` and the inputs to ``predict`` on are ignored.
    Either side without saved hyperparameters is not compared.

    Args:
        ckpt_path: the checkpoint file.
        model_hparams: the run's model hyperparameters (``model.hparams``, or the parsed ``model`` config with
            ``class_path`` / ``init_args``: then the checkpoint's are put in that shape), or ``None`` to skip the model.
        data_hparams: the run's data module hyperparameters, or ``None`` to skip the data.
        override_flag: what the error tells the user to pass to use the checkpoint anyway.
        model_ignore: model settings not compared (e.g. those a CLI links from the data module).
        data_ignore: data settings not compared (default: ``num_workers`` and ``predict``).

    Raises:
        ValueError: naming every differing setting with the checkpoint's and the run's values.

    Example:
        >>> check_checkpoint_config("runs/quickstart/version_0/checkpoints/last.ckpt", model.hparams)  # doctest: +SKIP
    """
    checkpoint = torch.load(ckpt_path, map_location="cpu", mmap=True, weights_only=False)
    saved_model = checkpoint.get("hyper_parameters")
    if saved_model and model_hparams and "init_args" in model_hparams:
        saved_model = model_config_from_hparams(saved_model)
    differences = []
    for part, saved, current, ignore in (
        ("model", saved_model, model_hparams, tuple(model_ignore)),
        ("data", checkpoint.get("datamodule_hyper_parameters"), data_hparams, tuple(data_ignore)),
    ):
        if saved and current:
            differences += [(f"{part}.{key}", *values) for key, *values in config_differences(saved, current, ignore)]
    if differences:
        lines = "\n".join(
            f"  {key}: {_shown(saved)} in the checkpoint, {_shown(current)} in this run" for key, saved, current in differences
        )
        raise ValueError(
            f"the checkpoint {str(ckpt_path)!r} was saved with another configuration than this run's, so its weights "
            f"would stand for a model the config does not describe:\n{lines}\n"
            f"Use the config the checkpoint was trained with (its run directory's config.yaml), or pass {override_flag} "
            "to use it anyway"
        )
