"""Selecting samples of a batch of any nesting (dicts, lists, tuples of tensors and per-sample lists such as raw
texts): its size, its first samples, or the samples at given positions."""

from __future__ import annotations

from typing import Any

import torch
from lightning.fabric.utilities.apply_func import apply_to_collection
from torch import Tensor


def batch_size_of(batch: Any) -> int | None:
    """The first dimension of the first tensor in ``batch`` (``None`` if it has no tensor).

    Example:
        >>> batch_size_of({"text": ["a", "b"], "x": torch.zeros(2, 3)}), batch_size_of(["no", "tensor"])
        (2, None)
    """
    sizes: list[int] = []
    apply_to_collection(batch, Tensor, lambda t: sizes.append(t.shape[0]) if t.ndim else None)
    return sizes[0] if sizes else None


def slice_batch(batch: Any, max_samples: int | None) -> Any:
    """The first ``max_samples`` samples of ``batch``: tensors whose first dimension is the batch size, and lists of
    per-sample values (e.g. raw texts) of that length, inside any nesting of dicts, lists and tuples.

    Example:
        >>> out = slice_batch({"x": torch.zeros(8, 3), "text": ["a"] * 8, "k": torch.tensor(1.0)}, 2)
        >>> out["x"].shape, out["text"], out["k"].ndim
        (torch.Size([2, 3]), ['a', 'a'], 0)
    """
    size = batch_size_of(batch)
    if max_samples is None or size is None or size <= max_samples:
        return batch
    return select_samples(batch, slice(0, max_samples))


def select_samples(batch: Any, index: slice | Tensor) -> Any:
    """The samples ``index`` (a slice, or a 1-D tensor of positions) of ``batch``: tensors whose first dimension is
    the batch size, and lists of per-sample values of that length, inside any nesting of dicts, lists and tuples;
    everything else is kept as is.

    Example:
        >>> out = select_samples({"x": torch.arange(4), "text": list("abcd")}, torch.tensor([3, 1]))
        >>> out["x"].tolist(), out["text"]
        ([3, 1], ['d', 'b'])
    """
    size = batch_size_of(batch)
    positions = index.tolist() if isinstance(index, Tensor) else None

    def cut(value: Any) -> Any:
        if isinstance(value, Tensor):
            if not value.ndim or value.shape[0] != size:
                return value
            return value[index.to(value.device)] if isinstance(index, Tensor) else value[index]
        if isinstance(value, dict):
            return type(value)((key, cut(item)) for key, item in value.items())
        if isinstance(value, (list, tuple)):
            is_samples = len(value) == size and not any(isinstance(v, (Tensor, dict, list, tuple)) for v in value)
            if not is_samples:
                return type(value)(cut(v) for v in value)
            return [value[i] for i in positions] if positions is not None else value[index]
        return value

    return cut(batch)
