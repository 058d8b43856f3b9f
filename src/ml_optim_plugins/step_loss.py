"""The loss of a module on a batch, as its ``training_step`` computes it, evaluated deterministically: shared by the
gradient checker, the overfit check and the curvature probe, which must never disturb the real run."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

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


@contextlib.contextmanager
def fixed_randomness(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """Run the block with the global RNG seeded to ``seed``, and restore the caller's RNG state afterwards.

    Every evaluation of the loss inside such a block draws the same dropout masks (and any other noise), so the loss
    is a deterministic function of the parameters, which finite differences need.

    Example:
        >>> with fixed_randomness(0):
        ...     first = torch.rand(2)
        >>> with fixed_randomness(0):
        ...     torch.equal(torch.rand(2), first)
        True
    """
    devices = [device] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
