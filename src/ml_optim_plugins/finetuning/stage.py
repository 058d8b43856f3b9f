"""Stage: one phase of a freeze-then-finetune plan, as plain data (YAML-friendly for LightningCLI), and its triggers."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ml_optim_plugins.hyperparameters import check_integer, check_number, check_numbers


@dataclass
class Stage:
    """One phase of :class:`~ml_optim_plugins.StagedFinetuning`: which managed modules train, at which LR, from when.

    A stage starts when the first of its triggers fires while the previous stage runs: ``start_epoch`` (at the start
    of that epoch), ``start_step`` (before that optimizer step), or ``monitor`` (after ``patience`` validation runs
    without an improvement of ``min_delta`` in that logged metric). The first stage starts with training and needs
    no trigger.

    Args:
        trainable: selectors of the managed modules that train in this stage; every other managed module is frozen
            (``requires_grad=False``, kept in ``eval()``). A selector is a modality name (``"image"``), a module
            name or glob (``"encoders.text"``), optionally with a block index or slice (``"text[-2:]"``: the top two
            transformer layers; see :func:`~ml_optim_plugins.finetuning.encoder_blocks`). Empty: a linear probe.
        start_epoch: start at this epoch (0-based).
        start_step: start before this optimizer step (0-based ``trainer.global_step``).
        monitor: start when this validation metric has stopped improving.
        patience: validation runs without improvement before ``monitor`` fires.
        mode: ``"min"`` or ``"max"``: the direction in which ``monitor`` improves.
        min_delta: smallest change of ``monitor`` that counts as an improvement.
        lr_multipliers: factor on the base LR per selector (any module, managed or not, e.g. ``{"text[-1]": 0.4,
            "text[-2]": 0.15, "fusion": 1.0}``); the selector covering the fewest parameters wins; default 1.
        warmup_steps: warmup of the groups that become trainable at this stage (needs
            :class:`~ml_optim_plugins.WarmupDecay`); ``None``: its ``late_warmup_steps``; 0: none.
        train_bn: whether BatchNorm layers of trainable modules train (statistics and affine parameters); if not,
            they stay in ``eval()`` and frozen, as is common when finetuning with small batches.
        name: shown in logs and reports; default ``"stage{i}"``.

    Example:
        >>> Stage(trainable=["image", "text[-2:]"], start_epoch=2, lr_multipliers={"text": 0.3}, warmup_steps=20)
        Stage(trainable=['image', 'text[-2:]'], start_epoch=2, start_step=None, monitor=None, patience=2, mode='min', min_delta=0.0, lr_multipliers={'text': 0.3}, warmup_steps=20, train_bn=True, name=None)
    """

    trainable: list[str] = field(default_factory=list)
    start_epoch: int | None = None
    start_step: int | None = None
    monitor: str | None = None
    patience: int = 2
    mode: str = "min"
    min_delta: float = 0.0
    lr_multipliers: dict[str, float] = field(default_factory=dict)
    warmup_steps: int | None = None
    train_bn: bool = True
    name: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.trainable, str):
            self.trainable = [self.trainable]
        self.trainable = list(self.trainable)
        self.lr_multipliers = check_numbers("Stage lr_multipliers", self.lr_multipliers, at_least=0)
        for label, value in (("start_epoch", self.start_epoch), ("start_step", self.start_step),
                             ("warmup_steps", self.warmup_steps)):
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"Stage {label}={value!r}; expected an integer >= 0 or None")
        check_integer("Stage patience", self.patience, at_least=1)
        if self.mode not in ("min", "max"):
            raise ValueError(f"Stage mode={self.mode!r}; expected 'min' or 'max'")
        self.min_delta = check_number("Stage min_delta", self.min_delta, at_least=0)

    @property
    def has_trigger(self) -> bool:
        """Whether the stage says when it starts."""
        return self.start_epoch is not None or self.start_step is not None or self.monitor is not None

    def is_due(self, epoch: int, step: int, *, at_epoch_start: bool, plateau_pending: bool = False) -> bool:
        """Whether a trigger fires at ``epoch`` and optimizer ``step``: ``start_epoch`` (at that epoch's start, or at
        any step of a later epoch), ``start_step``, or ``monitor`` with a pending plateau (:func:`update_plateau`).

        Example:
            >>> [Stage(start_epoch=2).is_due(epoch, 0, at_epoch_start=True) for epoch in (1, 2)]
            [False, True]
        """
        return (
            (self.start_epoch is not None and epoch >= self.start_epoch
             and (at_epoch_start or epoch > self.start_epoch))
            or (self.start_step is not None and step >= self.start_step)
            or (self.monitor is not None and plateau_pending)
        )


def fresh_plateau() -> dict[str, Any]:
    """The plateau counters at the start of a stage: no best value, no wait, no pending start."""
    return {"best": None, "wait": 0, "pending": False}


def update_plateau(plateau: Mapping[str, Any], stage: Stage, value: float) -> dict[str, Any]:
    """The plateau counters (:func:`fresh_plateau`) after a validation run that measured ``value`` of
    ``stage.monitor``; ``pending``: the stage is due (this process's view; under DDP the callback all-reduces it).

    Example:
        >>> stage, state = Stage(monitor="val/loss", patience=2), fresh_plateau()
        >>> for loss in (1.0, 0.9, 0.95, 0.92):
        ...     state = update_plateau(state, stage, loss)
        >>> state
        {'best': 0.9, 'wait': 2, 'pending': True}
    """
    best, state, delta = plateau["best"], dict(plateau), stage.min_delta
    improved = best is None or (value < best - delta if stage.mode == "min" else value > best + delta)
    if improved and math.isfinite(value):
        state.update(best=value, wait=0)
    else:
        state["wait"] += 1
    state["pending"] = state["wait"] >= stage.patience
    return state
