"""Averaging tensors over the processes of a distributed run, in one collective: what a callback does with statistics
(per-modality scores, gradient dot products) that must decide the same thing on every rank."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def mean_over_ranks(strategy: Any, tensors: list[Tensor]) -> list[Tensor]:
    """The mean of each tensor over the processes of ``strategy`` (a Lightning strategy), in one collective on one
    flat buffer; new tensors shaped like the inputs (the inputs themselves on one process).

    Example:
        >>> from lightning.pytorch.strategies import SingleDeviceStrategy
        >>> mean_over_ranks(SingleDeviceStrategy("cpu"), [torch.ones(2), torch.zeros(())])
        [tensor([1., 1.]), tensor(0.)]
    """
    if not tensors or getattr(strategy, "world_size", 1) < 2:
        return list(tensors)
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    flat = strategy.reduce(torch.cat([t.reshape(-1).to(dtype) for t in tensors]), reduce_op="mean")
    parts = torch.split(flat, [t.numel() for t in tensors])
    return [part.view_as(t).to(t.dtype) for part, t in zip(parts, tensors)]
