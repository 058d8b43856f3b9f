"""L1 + L2 (elastic-net) weight penalties on chosen modules, with biases and normalisation weights left out."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from fnmatch import fnmatchcase

import torch
from torch import Tensor, nn

from ml_optim_plugins.hyperparameters import check_number
from ml_optim_plugins.names import name_matches

NORM_TYPES: tuple[type[nn.Module], ...] = (
    # torch.nn's batch and instance norms (every public subclass of its private _NormBase, torch 2.14).
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.LazyBatchNorm1d,
    nn.LazyBatchNorm2d,
    nn.LazyBatchNorm3d,
    nn.SyncBatchNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LazyInstanceNorm1d,
    nn.LazyInstanceNorm2d,
    nn.LazyInstanceNorm3d,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def elastic_net_penalty(params: Iterable[Tensor], l1: float = 0.0, l2: float = 0.0) -> Tensor:
    """``l1 * sum |w| + l2 * sum w**2`` over ``params``: lasso (``l2=0``), ridge (``l1=0``) or elastic net.

    Example:
        >>> elastic_net_penalty([torch.tensor([1.0, -2.0])], l1=0.1, l2=0.01)
        tensor(0.3500)
    """
    l1, l2 = check_number("l1", l1, at_least=0), check_number("l2", l2, at_least=0)
    total = torch.zeros(())
    for p in params:
        term = torch.zeros((), device=p.device, dtype=p.dtype)
        if l1:
            term = term + l1 * p.abs().sum()
        if l2:
            term = term + l2 * p.pow(2).sum()
        total = total.to(term.device) + term
    return total


def regularized_parameters(
    module: nn.Module, modules: Sequence[str] | None = None, exclude_bias_and_norm: bool = True
) -> dict[str, nn.Parameter]:
    """The parameters an elastic-net penalty should act on: ``{name: parameter}``.

    Args:
        module: the model.
        modules: names or globs of the submodules to penalise (``["encoders.*", "fusion"]``); ``None``: all.
        exclude_bias_and_norm: leave out biases and the weights of normalisation layers (BatchNorm, LayerNorm,
            GroupNorm, RMSNorm): penalising them shrinks scales and shifts, not the model's complexity.

    The noise parameters of variational dropout layers (``log_alpha``, ``log_sigma2``) are never selected, and a
    weight shared by two modules (tied embeddings) appears once.

    Raises:
        ValueError: a ``modules`` entry that matches no submodule.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
        >>> list(regularized_parameters(model))
        ['0.weight']
    """
    patterns = list(modules) if modules is not None else None
    if patterns is not None:
        names = [name for name, _ in module.named_modules()]
        for pattern in patterns:
            if not any(fnmatchcase(name, pattern) for name in names):
                top = sorted({n.split(".")[0] for n in names if n})
                raise ValueError(f"modules entry {pattern!r} matches no submodule; top-level modules are {top}")
    selected: dict[str, nn.Parameter] = {}
    seen: set[int] = set()  # tied weights (shared by two modules) are penalised once
    for module_name, sub in module.named_modules():
        if exclude_bias_and_norm and isinstance(sub, NORM_TYPES):
            continue
        variational = callable(getattr(sub, "kl", None))
        for param_name, param in sub.named_parameters(recurse=False):
            name = f"{module_name}.{param_name}" if module_name else param_name
            if exclude_bias_and_norm and param_name == "bias" or id(param) in seen:
                continue
            if variational and param_name != "weight":
                continue  # noise parameters of variational dropout (log_alpha, log_sigma2) are not weights
            if patterns is not None and not name_matches(module_name, patterns):
                continue
            seen.add(id(param))
            selected[name] = param
    return selected

