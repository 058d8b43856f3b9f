"""The LR-driver protocol: what another callback (a finetuning stage) may ask of the callback that sets the LRs.

:class:`~ml_optim_plugins.WarmupDecay` implements it. A callback that gates or rescales param groups (unfreezing an
encoder) asks the driver through these methods only, and reshapes param groups before the driver registers them
(:func:`place_before_lr_drivers`).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback


@runtime_checkable
class LRDriver(Protocol):
    """A callback that sets the LR of each param group of the optimizers it drives, from a base LR per group.

    Group and optimizer indices are those of ``trainer.optimizers``; a driver registers the groups at its
    ``on_fit_start``, so :meth:`check_base_lr`, :meth:`set_base_lr` and :meth:`restart_warmup` are valid from
    ``on_train_start`` on (and in any hook after it).

    Example:
        >>> from ml_optim_plugins import WarmupDecay
        >>> isinstance(WarmupDecay(warmup_steps=10), LRDriver)
        True
    """

    def drives(self, trainer: pl.Trainer, optimizer_index: int) -> bool:
        """Whether this callback sets the LRs of ``trainer.optimizers[optimizer_index]``."""
        ...

    def check_base_lr(self, optimizer_index: int, group_index: int, base_lr: float) -> float:
        """The group's effective base LR for ``base_lr``, changing nothing; ``ValueError`` if it is invalid."""
        ...

    def set_base_lr(self, optimizer_index: int, group_index: int, base_lr: float) -> None:
        """Change the group's base LR from the current step on, without a new warmup (0 gates the group)."""
        ...

    def restart_warmup(
        self, optimizer_index: int, group_index: int, warmup_steps: int | None = None, base_lr: float | None = None
    ) -> None:
        """Give the group a new warmup from the current step (``None``: the driver's default length)."""
        ...


def lr_driver(trainer: pl.Trainer, optimizer_index: int) -> LRDriver | None:
    """The first callback of ``trainer`` that drives ``trainer.optimizers[optimizer_index]``, or ``None``.

    Example:
        >>> from types import SimpleNamespace
        >>> lr_driver(SimpleNamespace(callbacks=[]), 0) is None
        True
    """
    for callback in trainer.callbacks:
        if isinstance(callback, LRDriver) and callback.drives(trainer, optimizer_index):
            return callback
    return None


def place_before_lr_drivers(callbacks: list[Callback], callback: Callback) -> None:
    """Move ``callback`` in ``callbacks`` (``trainer.callbacks``) ahead of the first LR driver, in place.

    A callback that splits or renames param groups at ``on_fit_start`` must do so before the driver registers them
    in its own ``on_fit_start``; Lightning calls callbacks in list order. Call it at ``setup``.

    Example:
        >>> from ml_optim_plugins import WarmupDecay
        >>> warmup, mine = WarmupDecay(warmup_steps=1), Callback()
        >>> callbacks = [warmup, mine]
        >>> place_before_lr_drivers(callbacks, mine)
        >>> callbacks == [mine, warmup]
        True
    """
    first = next((i for i, c in enumerate(callbacks) if isinstance(c, LRDriver)), None)
    if first is not None and callbacks.index(callback) > first:
        callbacks.remove(callback)
        callbacks.insert(first, callback)
