"""A module's detached copy (without its Trainer, optionally in another dtype) and the device it lives on: what the
gradient checker, the overfit check and the curvature probe evaluate instead of the model being trained."""

from __future__ import annotations

import copy

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn


def detached_copy(module: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A deep copy of ``module`` (without its Trainer), optionally cast to ``dtype``; the original is not touched.

    Example:
        >>> model = nn.Linear(2, 1)
        >>> clone = detached_copy(model, torch.float64)
        >>> clone.weight.dtype, model.weight.dtype, clone.weight.data_ptr() != model.weight.data_ptr()
        (torch.float64, torch.float32, True)
    """
    # Callables kept on the modules (an optimizer factory, a tokenizer) are shared, not copied: LightningCLI's
    # factories reach the CLI, its Trainer, the data and, under DDP, the DDP wrapper, which cannot be deep-copied.
    shared = {
        id(value): value
        for sub in module.modules()
        for value in vars(sub).values()
        if callable(value) and not isinstance(value, (nn.Module, Tensor, type)) and not hasattr(value, "__self__")
    }
    clone = copy.deepcopy(module, memo=shared)  # bound methods (Lightning's redirected `forward`) follow the copy
    if isinstance(clone, LightningModule):
        # LightningModule drops its trainer when pickled; make sure the copy (and its submodules) has no Fabric either.
        clone.trainer = None
        clone.fabric = None
    if dtype is not None:
        clone = clone.to(dtype)
    return clone


def module_device(module: nn.Module) -> torch.device:
    """The device of the module's first parameter or buffer (CPU if it has none).

    Example:
        >>> module_device(nn.Linear(2, 1)), module_device(nn.ReLU())
        (device(type='cpu'), device(type='cpu'))
    """
    for tensor in [*module.parameters(), *module.buffers()]:
        return tensor.device
    return torch.device("cpu")
