"""Map an optimizer's param groups to module names: LR multipliers by module name or glob, and stable group names."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Any

from torch import nn
from torch.optim import Optimizer

from ml_optim_plugins.hyperparameters import check_numbers
from ml_optim_plugins.names import name_matches, name_prefixes


# Wrappers that FSDP and activation checkpointing insert into parameter names; users name the modules they wrote.
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def parameter_names(module: nn.Module) -> dict[int, str]:
    """``id(parameter) -> qualified name`` for every parameter of ``module`` (shared ones under their first name),
    without the wrapper modules that FSDP, activation checkpointing and ``torch.compile`` insert."""
    names = {}
    for name, p in module.named_parameters(remove_duplicate=True):
        for wrapper in _WRAPPER_PREFIXES:
            name = name.replace(wrapper, "")
        names[id(p)] = name
    return names


def _is_glob(key: str) -> bool:
    return any(c in key for c in "*?[")


def multiplier_key(name: str, multipliers: Mapping[str, float]) -> str | None:
    """The key of ``multipliers`` that applies to parameter ``name``, or ``None``.

    A key is a module name (``"encoders.image"``), a parameter name, or a glob (``"encoders.*"``, ``"*.bias"``; ``*``
    also matches dots). The most specific key wins: exact names before globs; then the key matching the longest part
    of the parameter's name (its own name, then each enclosing module); then the glob with the most literal
    characters; then the first in ``multipliers``.

    Example:
        >>> multiplier_key("encoders.image.conv.weight", {"encoders.*": 0.5, "encoders.image": 0.1})
        'encoders.image'
        >>> multiplier_key("encoders.text.layer.bias", {"encoders.*": 0.5, "encoders.image": 0.1})
        'encoders.*'
        >>> multiplier_key("encoders.image.conv.weight", {"*": 1.0, "encoders.*": 0.5, "encoders.image.*": 0.1})
        'encoders.image.*'
        >>> multiplier_key("fusion.head.bias", {"encoders.*": 0.5}) is None
        True
    """
    for exact in (True, False):
        keys = [key for key in multipliers if _is_glob(key) != exact]
        for prefix in name_prefixes(name):
            matches = [key for key in keys if fnmatchcase(prefix, key)]
            if matches:
                # Among globs matching the same part, the one with the most literal characters is the most specific
                # ("encoders.image.*" over "encoders.*" over "*"); max() keeps the first of equals.
                return max(matches, key=lambda key: len(key) - sum(key.count(c) for c in "*?[]"))
    return None


def check_multiplier_keys(multipliers: Mapping[str, float], names: Iterable[str], owner: str) -> None:
    """Raise a ``ValueError`` for a multiplier that is negative or not finite, or that matches no parameter of the
    module (a typo)."""
    names = list(names)
    check_numbers(f"{owner}: lr_multipliers", multipliers, at_least=0)
    for key in multipliers:
        if not any(name_matches(name, [key]) for name in names):
            top = sorted({name.split(".")[0] for name in names})
            raise ValueError(
                f"{owner}: lr_multipliers key {key!r} matches no parameter of the module; keys are module or "
                f"parameter names or globs, e.g. one of its top-level modules {top}"
            )


def _common_module(names: list[str]) -> str:
    """Longest dotted prefix shared by every name (``""`` if none), cut at a module boundary."""
    if not names:
        return ""
    common = names[0].split(".")[:-1]
    for name in names[1:]:
        parts = name.split(".")
        n = 0
        while n < min(len(common), len(parts) - 1) and common[n] == parts[n]:
            n += 1
        common = common[:n]
    return ".".join(common)


def module_label(names: Sequence[str]) -> str:
    """The innermost module holding every parameter in ``names``, else their top-level modules joined by ``+``.

    Example:
        >>> module_label(["encoders.text.layer.0.weight", "encoders.text.layer.1.bias"])
        'encoders.text.layer'
        >>> module_label(["vision.weight", "language.weight", "head.bias"])
        'vision+language+head'
    """
    return _common_module(list(names)) or "+".join(dict.fromkeys(name.split(".")[0] for name in names))


def group_keys(group: Mapping[str, Any], names: Mapping[int, str], multipliers: Mapping[str, float]) -> list[str | None]:
    """The multiplier key of each parameter of ``group`` (``None`` where none applies or the name is unknown)."""
    return [multiplier_key(names[id(p)], multipliers) if id(p) in names else None for p in group["params"]]


def split_groups(
    optimizer: Optimizer, names: Mapping[int, str], keys: Callable[[Mapping[str, Any]], list[str | None]]
) -> None:
    """Split, in place, every param group whose parameters get different ``keys(group)`` (one key per parameter).

    Each part is named after its key (the part under ``None``: after the innermost module holding all its
    parameters, else ``default``), prefixed with the group's name if it has one, and keeps the group's
    hyperparameters; the optimizer's per-parameter state is keyed by parameter, so it is unaffected. Parts are
    inserted where the group was, in the order their keys first appear, so group order is deterministic and a
    checkpoint of the split optimizer loads into a freshly split one.
    """
    new_groups: list[dict[str, Any]] = []
    for group in optimizer.param_groups:
        group_keys_ = keys(group)
        if len(set(group_keys_)) <= 1:
            new_groups.append(group)
            continue
        for key in dict.fromkeys(group_keys_):
            part = {k: v for k, v in group.items() if k != "params"}
            part["params"] = [p for p, k in zip(group["params"], group_keys_) if k == key]
            label = key or _common_module([names[id(p)] for p in part["params"] if id(p) in names]) or "default"
            part["name"] = f"{group['name']}/{label}" if "name" in group else label
            new_groups.append(part)
    optimizer.param_groups[:] = new_groups


def split_groups_by_multiplier(
    optimizer: Optimizer, names: Mapping[int, str], multipliers: Mapping[str, float]
) -> None:
    """Split, in place, every param group whose parameters fall under different ``multipliers`` keys (see
    :func:`split_groups`); each part is named after its multiplier key."""
    split_groups(optimizer, names, lambda group: group_keys(group, names, multipliers))


def name_group(optimizer: Optimizer, index: int, names: Mapping[int, str], multipliers: Mapping[str, float]) -> str:
    """Give param group ``index`` a ``name`` if it has none, and return it.

    The name is its multiplier key if all its parameters share one, else the innermost module containing all its
    parameters, else ``pg{index + 1}``; made unique within the optimizer. Names keep ``LearningRateMonitor``'s keys
    stable when groups are split or added.
    """
    group = optimizer.param_groups[index]
    if "name" not in group:
        keys = set(group_keys(group, names, multipliers))
        key = keys.pop() if len(keys) == 1 else None
        label = key or _common_module([names[id(p)] for p in group["params"] if id(p) in names]) or f"pg{index + 1}"
        taken = {g.get("name") for i, g in enumerate(optimizer.param_groups) if i != index}
        group["name"] = label if label not in taken else f"{label}-{index + 1}"
    return group["name"]
