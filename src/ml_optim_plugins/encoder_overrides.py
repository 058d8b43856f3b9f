"""Overrides of one encoder on the command line or in a second ``-c`` file keep the other encoders.

``MultimodalClassifier.encoders`` is a mapping of modality to encoder. jsonargparse (4.x) merges a subclass spec given
twice, but replaces a mapping given twice: a second ``-c`` file that sets only ``encoders.image`` drops the text
encoder, which surfaced later as a selector error. And a command-line ``null`` inside that mapping
(``--model.init_args.encoders.image.init_args.checkpoint_path null``) reaches the encoder as the string ``'None'``:
jsonargparse rebuilds such a nested argument as ``--key={value}`` text, and Python prints None as ``None``.

:func:`merge_encoder_overrides` merges every source of the mapping, in command-line order, the way jsonargparse merges
a single subclass spec, and hands jsonargparse the result as one full mapping. Per modality: the same ``class_path``
(or none) updates ``init_args`` key by key; another ``class_path`` replaces the encoder with its own arguments; ``null``
removes the modality.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

CONFIG_FLAGS = ("-c", "--config")
ENCODER_KEYS = ("model.init_args.encoders", "model.encoders")
SUBCOMMANDS = ("fit", "validate", "test", "predict")


def _encoders_in_config(text: str) -> Mapping[str, Any] | None:
    """The ``encoders`` mapping that a ``-c`` value (a YAML file, or YAML text) sets, if any."""
    path = Path(text)
    try:
        data = yaml.safe_load(path.read_text() if path.is_file() else text)
    except (OSError, yaml.YAMLError):
        return None  # jsonargparse reports it
    if not isinstance(data, Mapping):
        return None
    for root in (data, *(data.get(name) for name in SUBCOMMANDS)):
        model = root.get("model") if isinstance(root, Mapping) else None
        if not isinstance(model, Mapping):
            continue
        init_args = model.get("init_args")
        encoders = init_args.get("encoders") if isinstance(init_args, Mapping) else model.get("encoders")
        if isinstance(encoders, Mapping):
            return encoders
    return None


def _encoders_argument(key: str, value: str) -> Mapping[str, Any] | None:
    """``{modality: ...}`` from ``--model.init_args.encoders[.modality[.rest]] value`` (``None`` if not one)."""
    prefix = next((k for k in ENCODER_KEYS if key == f"--{k}" or key.startswith(f"--{k}.")), None)
    if prefix is None:
        return None
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        parsed = value
    path = [part for part in key[len(prefix) + 2 :].split(".") if part]
    for part in reversed(path):
        parsed = {part: parsed}
    return parsed if isinstance(parsed, Mapping) else None


def _merge_encoder(old: Any, new: Any) -> Any:
    """One modality's spec updated by ``new``: jsonargparse's rule for a subclass spec given twice."""
    new = {"class_path": new} if isinstance(new, str) else new
    old = {"class_path": old} if isinstance(old, str) else old
    if not isinstance(new, Mapping) or not isinstance(old, Mapping):
        return new
    if new.get("class_path", old.get("class_path")) != old.get("class_path"):
        return dict(new)  # another class: only its own arguments
    init_args = {**(old.get("init_args") or {}), **(new.get("init_args") or {})}
    merged = {**old, **new}
    if init_args:
        merged["init_args"] = init_args
    return merged


def merge_encoders(base: Mapping[str, Any] | None, override: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``override``, modality by modality (``None`` removes a modality).

    Example:
        >>> base = {"image": {"class_path": "TimmImageEncoder", "init_args": {"model_name": "resnet10t",
        ...                                                                  "checkpoint_path": "runs/x.ckpt"}},
        ...         "text": {"class_path": "SentenceTransformerTextEncoder"}}
        >>> merged = merge_encoders(base, {"image": {"init_args": {"checkpoint_path": None}}})
        >>> merged["image"]["init_args"], sorted(merged)
        ({'model_name': 'resnet10t', 'checkpoint_path': None}, ['image', 'text'])
        >>> sorted(merge_encoders(base, {"text": None}))
        ['image']
    """
    merged = dict(base or {})
    for name, entry in override.items():
        if entry is None:
            merged.pop(name, None)
        else:
            merged[name] = _merge_encoder(merged.get(name), entry)
    return merged


def _option(argv: Sequence[str], index: int) -> tuple[str, str | None, int]:
    """``(key, value, arguments used)`` of the option at ``argv[index]`` (``--key=value`` or ``--key value``)."""
    arg = argv[index]
    if "=" in arg and arg.startswith("--"):
        key, value = arg.split("=", 1)
        return key, value, 1
    value = argv[index + 1] if index + 1 < len(argv) else None
    return arg, value, 2


def merge_encoder_overrides(argv: Sequence[str]) -> list[str]:
    """Command-line arguments in which every override of ``model.init_args.encoders`` (in ``-c`` files and
    ``--model.init_args.encoders...`` arguments) is merged, in order, into one full mapping given last.

    Arguments are returned unchanged when at most one source sets the encoders and none is a command-line argument
    (there is nothing to merge).

    Example:
        >>> merge_encoder_overrides(["fit", "--model.init_args.encoders.image.init_args.checkpoint_path", "null"])
        ['fit', '--model.init_args.encoders={"image": {"init_args": {"checkpoint_path": null}}}']
        >>> merge_encoder_overrides(["fit", "-c", "model: {init_args: {encoders: {image: A}}}"])
        ['fit', '-c', 'model: {init_args: {encoders: {image: A}}}']
    """
    argv = list(argv)
    kept: list[str] = []
    merged: dict[str, Any] | None = None
    sources, from_arguments = 0, False
    index = 0
    while index < len(argv):
        key, value, used = _option(argv, index)
        if key in CONFIG_FLAGS and value is not None:
            override = _encoders_in_config(value)
            if override is not None:
                merged, sources = merge_encoders(merged, override), sources + 1
            kept.extend(argv[index : index + used])
            index += used
            continue
        override = _encoders_argument(key, value) if key.startswith("--") and value is not None else None
        if override is not None:  # replaced by the merged mapping
            merged, sources, from_arguments = merge_encoders(merged, override), sources + 1, True
            index += used
            continue
        kept.append(argv[index])
        index += 1
    if merged is None or (sources < 2 and not from_arguments):
        return argv
    return [*kept, f"--{ENCODER_KEYS[0]}={json.dumps(merged, default=str)}"]
