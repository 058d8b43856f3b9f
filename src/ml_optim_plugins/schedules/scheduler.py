"""A torch ``LRScheduler`` that follows a :class:`WarmupDecaySchedule`, for ``configure_optimizers``."""

from __future__ import annotations

from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from ml_optim_plugins.schedules.schedule import WarmupDecaySchedule


def _group_label(group: dict[str, Any], index: int) -> str:
    return repr(group["name"]) if "name" in group else f"#{index}"


class WarmupDecayLR(LRScheduler):
    """Torch LR scheduler over a :class:`WarmupDecaySchedule`; build it with :func:`warmup_decay_scheduler`.

    Each param group follows the schedule from its own base LR (its ``lr`` when the scheduler was created). A param
    group added to the optimizer later (e.g. when an encoder is unfrozen) is picked up on the next ``step()``, with
    its ``lr`` at that time as its base LR and its own warmup from that step (see
    :meth:`WarmupDecaySchedule.group_lr`). Lightning steps the scheduler after the optimizer, so the new group's first
    optimizer step runs at the LR it was added with; the :class:`~ml_optim_plugins.WarmupDecay` callback, which acts
    before each step, catches it before that first step. The step count lives in ``last_epoch``, as in every torch scheduler; it
    counts optimizer steps when Lightning steps the scheduler with ``interval="step"``.

    Args:
        optimizer: the optimizer whose groups it drives.
        schedule: the schedule; resolved (``total_steps`` needed by the decay must be set).
        last_epoch: index of the last step taken, ``-1`` for a fresh start (torch's convention).

    Example:
        >>> import torch
        >>> from ml_optim_plugins.schedules import WarmupDecaySchedule
        >>> optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        >>> scheduler = WarmupDecayLR(optimizer, WarmupDecaySchedule(total_steps=4, decay="linear"))
        >>> [round(lr, 2) for lr in scheduler.get_last_lr()]
        [1.0]
    """

    def __init__(self, optimizer: Optimizer, schedule: WarmupDecaySchedule, last_epoch: int = -1) -> None:
        self.schedule = schedule.resolve()
        for index, group in enumerate(optimizer.param_groups):
            self.schedule.check_base_lr(group.get("initial_lr", group["lr"]), _group_label(group, index))
        # Step at which each group joined: 0 for the groups present now.
        self.first_steps: list[int] = [0] * len(optimizer.param_groups)
        super().__init__(optimizer, last_epoch)

    def _register_new_groups(self) -> None:
        groups = self.optimizer.param_groups
        for index in range(len(self.base_lrs), len(groups)):
            base_lr = groups[index].setdefault("initial_lr", groups[index]["lr"])
            self.schedule.check_base_lr(base_lr, _group_label(groups[index], index))
            self.base_lrs.append(base_lr)
            self.first_steps.append(max(self.last_epoch, 0))

    def get_lr(self) -> list[float]:
        """The LR of every param group at step ``last_epoch``."""
        self._register_new_groups()
        step = max(self.last_epoch, 0)
        return [
            self.schedule.group_lr(step, base_lr, first)
            for base_lr, first in zip(self.base_lrs, self.first_steps)
        ]

    def state_dict(self) -> dict[str, Any]:
        """Counters and base LRs only (plain data, so ``torch.load(weights_only=True)`` reads it): the schedule itself
        is configuration and is rebuilt by the code that created the scheduler."""
        return {key: value for key, value in self.__dict__.items() if key not in ("optimizer", "schedule")}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        self.__dict__.update(state_dict)


def warmup_decay_scheduler(
    optimizer: Optimizer, schedule: WarmupDecaySchedule | None = None, *, last_epoch: int = -1, **schedule_args: Any
) -> WarmupDecayLR:
    """A torch ``LRScheduler`` for warmup + decay, to return from ``configure_optimizers`` with ``interval="step"``.

    Use it when you write ``configure_optimizers`` yourself; use the :class:`~ml_optim_plugins.WarmupDecay` callback
    to drive an optimizer without touching it. Lightning calls ``scheduler.step()`` once per optimizer step with
    ``interval="step"`` (after gradient accumulation), so the lengths below are optimizer steps;
    ``self.trainer.estimated_stepping_batches`` gives ``total_steps`` inside ``configure_optimizers``.

    Args:
        optimizer: the optimizer to drive; each group keeps its own base LR (its current ``lr``).
        schedule: a :class:`~ml_optim_plugins.schedules.WarmupDecaySchedule`; or give its arguments as keywords instead.
        last_epoch: torch's resume index (``-1`` for a fresh start).
        **schedule_args: arguments of :class:`~ml_optim_plugins.schedules.WarmupDecaySchedule` when ``schedule`` is None.

    Returns:
        A :class:`WarmupDecayLR`.

    Raises:
        ValueError: for bad schedule arguments, a decay that needs ``total_steps`` without it, a warmup longer than
            training, or a ``min_lr`` above a group's LR.
        TypeError: an unknown keyword, or both ``schedule`` and keyword arguments.

    Example:
        >>> import torch
        >>> from ml_optim_plugins import warmup_decay_scheduler
        >>> optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        >>> scheduler = warmup_decay_scheduler(optimizer, warmup_steps=2, total_steps=6, decay="linear")
        >>> lrs = []
        >>> for _ in range(6):
        ...     lrs.append(round(optimizer.param_groups[0]["lr"], 4))
        ...     optimizer.step()
        ...     scheduler.step()
        >>> lrs
        [0.0, 0.05, 0.1, 0.075, 0.05, 0.025]

        In a LightningModule::

            def configure_optimizers(self):
                optimizer = torch.optim.AdamW(self.parameters(), lr=3e-4)
                scheduler = warmup_decay_scheduler(
                    optimizer, warmup_ratio=0.05, total_steps=self.trainer.estimated_stepping_batches
                )
                return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
    """
    return WarmupDecayLR(optimizer, WarmupDecaySchedule.from_arguments(schedule, **schedule_args), last_epoch=last_epoch)
