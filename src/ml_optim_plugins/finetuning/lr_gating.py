"""Param groups gated stage by stage: split by stage plan at fit start, then each stage's LRs, set directly or
through the LR driver (:class:`~ml_optim_plugins.schedules.LRDriver`)."""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from typing import Any

import lightning.pytorch as pl
from torch.optim import Optimizer

from ml_optim_plugins.finetuning.plan import FinetuningPlan
from ml_optim_plugins.schedules import LRDriver, lr_driver, name_group, split_groups

#: Param-group key holding a group's base LR before stage multipliers (saved with the optimizer's state).
BASE_LR_KEY = "staged_base_lr"


class GatedParamGroups:
    """The param groups of a run's optimizers, split so that parameters with different stage plans are in different
    groups, each with the base LR of the current stage: its configured LR times the stage's multiplier, 0 while frozen.

    Every group exists from the start, so the optimizer's shape never changes: ``LearningRateMonitor`` keys stay, and a
    checkpoint of the split optimizer loads into a freshly split one. An optimizer driven by an LR scheduler of
    ``configure_optimizers`` keeps its groups and LRs (frozen parameters get no gradient, so it skips them).

    Args:
        plan: the resolved plan.
        optimizers: the run's optimizers (``trainer.optimizers``).
        drivers: per optimizer, the LR driver that sets its LRs, or ``None``.
        scheduled: ``id()`` of the optimizers that an LR scheduler from ``configure_optimizers`` drives.

    Example:
        >>> import torch
        >>> from ml_optim_plugins import Stage
        >>> model = torch.nn.ModuleDict({"enc": torch.nn.Linear(2, 2), "head": torch.nn.Linear(2, 1)})
        >>> plan = FinetuningPlan.resolve(model, [Stage(name="probe"), Stage(start_epoch=1, trainable=["enc"],
        ...                                                                 lr_multipliers={"enc": 0.5})], ["enc"])
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> groups = GatedParamGroups(plan, [optimizer], [None], set())
        >>> groups.prepare(fast_dev_run=False)
        >>> groups.enter(0, previous=plan.trainable[0], initial=True)
        >>> [(g["name"], g["lr"]) for g in optimizer.param_groups]
        [('pg1/enc/stage1', 0.0), ('pg1/head/probe', 0.1)]
        >>> groups.enter(1, previous=plan.trainable[0], initial=False)
        >>> [g["lr"] for g in optimizer.param_groups]
        [0.05, 0.1]
    """

    def __init__(
        self,
        plan: FinetuningPlan,
        optimizers: Sequence[Optimizer],
        drivers: Sequence[LRDriver | None],
        scheduled: Collection[int],
    ) -> None:
        self.plan, self.optimizers, self.drivers, self.scheduled = plan, list(optimizers), list(drivers), set(scheduled)

    @classmethod
    def from_trainer(cls, plan: FinetuningPlan, trainer: pl.Trainer) -> GatedParamGroups:
        """The prepared (:meth:`prepare`) groups of ``trainer``'s optimizers, with the LR driver of each and the
        optimizers that ``configure_optimizers``' schedulers drive; call it at ``on_fit_start``."""
        drivers = [lr_driver(trainer, i) for i in range(len(trainer.optimizers))]
        scheduled = {id(config.scheduler.optimizer) for config in trainer.lr_scheduler_configs}
        groups = cls(plan, trainer.optimizers, drivers, scheduled)
        groups.prepare(fast_dev_run=bool(trainer.fast_dev_run))
        return groups

    def prepare(self, fast_dev_run: bool) -> None:
        """Check each optimizer's LR control against the plan, name unnamed groups, split the groups by stage plan and
        record each group's configured LR (under :data:`BASE_LR_KEY`)."""
        for index, optimizer in enumerate(self.optimizers):
            driven = self.drivers[index] is not None
            foreign = not driven and id(optimizer) in self.scheduled  # a scheduler of configure_optimizers owns them
            self.plan.check_lr_driver(index, type(optimizer).__name__, driven=driven, foreign_scheduler=foreign,
                                      fast_dev_run=fast_dev_run)
            for group_index in range(len(optimizer.param_groups)):  # unnamed groups: parts need a unique prefix
                name_group(optimizer, group_index, self.plan.names, {})
            if foreign:
                # Freezing alone: frozen parameters get no gradient, so the optimizer skips them; the groups (which the
                # scheduler was built for) stay as they are, and their LRs are the scheduler's (issue 17).
                continue
            split_groups(optimizer, self.plan.names, self.plan.group_labels)
            for group in optimizer.param_groups:
                group.setdefault(BASE_LR_KEY, float(group.get("initial_lr", group["lr"])))

    def groups(self) -> Iterator[tuple[int, int, dict[str, Any], int]]:
        """``(optimizer index, group index, group, id of its first parameter)`` for every prepared group; all
        parameters of a group share one stage plan, the first one's."""
        for opt_index, optimizer in enumerate(self.optimizers):
            for group_index, group in enumerate(optimizer.param_groups):
                first = next((id(p) for p in group["params"]), None)
                if first is not None and BASE_LR_KEY in group:
                    yield opt_index, group_index, group, first

    def enter(self, index: int, previous: Collection[int], initial: bool) -> None:
        """Set the base LRs of stage ``index``; with an LR driver, groups that were not trainable in ``previous`` (the
        trainable set before) get the stage's warmup. ``initial``: at fit start, before the driver registers the
        groups, so the LRs are set in the groups, where it reads them."""
        trainable, stage = self.plan.trainable[index], self.plan.stages[index]
        for opt_index, group_index, group, first in self.groups():
            driver = self.drivers[opt_index]
            base = self.plan.base_lr(group[BASE_LR_KEY], first, index)
            if driver is not None and not initial:
                if first in trainable and first not in previous:
                    driver.restart_warmup(opt_index, group_index, stage.warmup_steps, base_lr=base)
                else:
                    driver.set_base_lr(opt_index, group_index, base)
            elif driver is not None or id(self.optimizers[opt_index]) not in self.scheduled:
                group["lr"] = base

    def check_base_lrs(self) -> None:
        """Ask each group's LR driver whether the group's base LR in every stage in which it trains is valid (e.g. not
        under an absolute ``min_lr``); call it once the drivers have registered the groups (``on_train_start``).

        Raises:
            ValueError: the driver's error, prefixed with the stage.
        """
        for opt_index, group_index, group, first in self.groups():
            driver = self.drivers[opt_index]
            if driver is None:
                continue
            for i, trainable in enumerate(self.plan.trainable):
                if first in trainable:
                    try:
                        driver.check_base_lr(opt_index, group_index, self.plan.base_lr(group[BASE_LR_KEY], first, i))
                    except ValueError as err:
                        raise ValueError(f"stage {i} ({self.plan.stage_name(i)}): {err}") from err
