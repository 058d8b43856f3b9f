"""The loss of a module on a batch, evaluated deterministically on a detached copy: shared by the gradient checker,
the overfit check and the curvature probe, which must never disturb the real run."""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import apply_to_collection
from lightning.pytorch import LightningModule
from torch import Tensor, nn

from ml_optim_plugins.lightning_internals import logging_step

LossFn = Callable[[nn.Module, Any], Tensor]


def training_step_loss(module: nn.Module, batch: Any) -> Tensor:
    """The loss ``module.training_step(batch, 0)`` returns (a tensor, or the ``"loss"`` entry of a dict).

    Works on any LightningModule whose ``training_step`` returns its loss, including one not attached to a Trainer
    (its ``self.log`` calls are silenced).

    Raises:
        TypeError: if the module has no ``training_step`` or it returns no loss tensor.

    Example:
        >>> from lightning.pytorch.demos.boring_classes import BoringModel
        >>> training_step_loss(BoringModel(), torch.randn(4, 32)).ndim
        0
    """
    step = getattr(module, "training_step", None)
    if step is None:
        raise TypeError(
            f"{type(module).__name__} has no training_step; pass loss_fn=lambda module, batch: <scalar loss>"
        )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*self.log.*")
        warnings.filterwarnings("ignore", message=".*trainer.*reference is not registered.*")
        out = step(batch, 0)
    loss = out.get("loss") if isinstance(out, dict) else out
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise TypeError(
            f"{type(module).__name__}.training_step returned {type(out).__name__}, not a scalar loss tensor (or a dict "
            "with 'loss'); pass loss_fn"
        )
    return loss.reshape(())


def require_loss_fn_under_manual_optimization(module: Any, loss_fn: LossFn | None, owner: str) -> None:
    """Refuse, before training, to evaluate a manual-optimization module's loss through its ``training_step``.

    Such a ``training_step`` calls ``self.optimizers()``, ``manual_backward`` and ``step()``: it cannot run on a
    detached copy outside the Trainer, so the callback ``owner`` needs an explicit ``loss_fn(module, batch)``.

    Raises:
        MisconfigurationException: ``module.automatic_optimization`` is False and ``loss_fn`` is None.

    Example:
        >>> from lightning.pytorch.demos.boring_classes import BoringModel
        >>> require_loss_fn_under_manual_optimization(BoringModel(), None, "GradientCheck")  # automatic: fine
    """
    if loss_fn is None and not getattr(module, "automatic_optimization", True):
        from lightning.pytorch.utilities.exceptions import MisconfigurationException

        raise MisconfigurationException(
            f"{owner} evaluates the loss through training_step, but {type(module).__name__} uses manual optimization "
            f"(its training_step steps the optimizers); pass {owner}(loss_fn=lambda module, batch: <scalar loss>)"
        )


def detached_copy(module: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A deep copy of ``module`` (without its Trainer), optionally cast to ``dtype``; the original is not touched."""
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


def batch_size_of(batch: Any) -> int | None:
    """The first dimension of the first tensor in ``batch`` (``None`` if it has no tensor)."""
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


@contextlib.contextmanager
def fixed_randomness(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """Run the block with the global RNG seeded to ``seed``, and restore the caller's RNG state afterwards.

    Every evaluation of the loss inside such a block draws the same dropout masks (and any other noise), so the loss
    is a deterministic function of the parameters, which finite differences need.
    """
    devices = [device] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def module_device(module: nn.Module) -> torch.device:
    """The device of the module's first parameter or buffer (CPU if it has none)."""
    for tensor in [*module.parameters(), *module.buffers()]:
        return tensor.device
    return torch.device("cpu")


def mean_over_ranks(strategy: Any, tensors: list[Tensor]) -> list[Tensor]:
    """The mean of each tensor over the processes of ``strategy`` (a Lightning strategy), in one collective on one
    flat buffer; new tensors shaped like the inputs (the inputs themselves on one process)."""
    if not tensors or getattr(strategy, "world_size", 1) < 2:
        return list(tensors)
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    flat = strategy.reduce(torch.cat([t.reshape(-1).to(dtype) for t in tensors]), reduce_op="mean")
    parts = torch.split(flat, [t.numel() for t in tensors])
    return [part.view_as(t).to(t.dtype) for part, t in zip(parts, tensors)]


def log_to_loggers(trainer: Any, metrics: dict[str, float | Tensor]) -> None:
    """Send ``metrics`` straight to the Trainer's loggers at the current step, as ``LearningRateMonitor`` does.

    For values a callback produces every N steps: logged with ``LightningModule.log`` from a callback hook, Lightning
    would repeat the last value in every later row until the next one.
    """
    values = {key: float(value) for key, value in metrics.items()}
    step = logging_step(trainer)
    for logger in trainer.loggers:
        logger.log_metrics(values, step=step)
