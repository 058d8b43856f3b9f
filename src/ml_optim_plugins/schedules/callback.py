"""WarmupDecay: drive the learning rate of optimizers the user already configured."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch.optim import Optimizer

from ml_optim_plugins.hyperparameters import check_integer, check_numbers
from ml_optim_plugins.schedules.param_groups import (
    check_multiplier_keys,
    group_keys,
    name_group,
    parameter_names,
    split_groups_by_multiplier,
)
from ml_optim_plugins.schedules.schedule import WarmupDecaySchedule


class WarmupDecay(Callback):
    """Learning-rate warmup and decay for the optimizers a LightningModule already configures.

    No change to ``configure_optimizers``: before every optimizer step (once per real step, per optimizer) the
    callback sets each param group's ``lr`` from the group's own base LR (its ``lr`` when training starts, times an
    optional multiplier by module name) and a :class:`~ml_optim_plugins.schedules.WarmupDecaySchedule`. At ``on_fit_start`` it
    derives ``total_steps`` from the Trainer when not given, checks the schedule against the run, and splits and names
    param groups so ``LearningRateMonitor`` logs stable keys. A param group that joins mid-run gets its own warmup; with
    :meth:`restart_warmup`, :meth:`set_base_lr`, :meth:`check_base_lr` and :meth:`drives` it implements the
    :class:`~ml_optim_plugins.schedules.LRDriver` protocol. Its :meth:`state_dict` resumes the LR trajectory exactly.
    docs/schedules.md describes each hook.

    Args:
        schedule: the warmup + decay; or give its arguments as keywords (``warmup_steps=100, decay="cosine"``).
        lr_multipliers: base-LR multiplier per module name, parameter name or glob (discriminative LRs), e.g.
            ``{"encoders.image": 0.1, "encoders.text": 0.3}``; the most specific match wins.
        late_warmup_steps: warmup of groups that join mid-run; defaults to the schedule's warmup length.
        optimizers: indices (in ``trainer.optimizers``) of the optimizers to drive; default all.
        **schedule_args: arguments of :class:`~ml_optim_plugins.schedules.WarmupDecaySchedule` when ``schedule`` is None.

    Raises:
        ValueError: bad schedule arguments (at construction); a warmup longer than training, a ``min_lr`` above a
            group's LR, or an ``lr_multipliers`` key that matches nothing (before the first step).
        MisconfigurationException: a LR scheduler is attached to an optimizer this callback drives, or an optimizer
            index is out of range.

    Example::

        from lightning.pytorch import Trainer
        from lightning.pytorch.callbacks import LearningRateMonitor
        from ml_optim_plugins import WarmupDecay

        trainer = Trainer(max_epochs=10, callbacks=[
            WarmupDecay(warmup_ratio=0.05, decay="cosine", min_lr_ratio=0.01, lr_multipliers={"encoders.*": 0.1}),
            LearningRateMonitor(),
        ])
    """

    def __init__(
        self,
        schedule: WarmupDecaySchedule | None = None,
        *,
        lr_multipliers: Mapping[str, float] | None = None,
        late_warmup_steps: int | None = None,
        optimizers: Sequence[int] | None = None,
        **schedule_args: Any,
    ) -> None:
        self.schedule = WarmupDecaySchedule.from_arguments(schedule, **schedule_args)
        self.lr_multipliers = check_numbers("WarmupDecay: lr_multipliers", lr_multipliers or {}, at_least=0)
        if late_warmup_steps is not None:
            check_integer("late_warmup_steps", late_warmup_steps, at_least=0)
        self.late_warmup_steps = late_warmup_steps
        self.optimizer_indices = None if optimizers is None else [int(i) for i in optimizers]
        self.resolved: WarmupDecaySchedule | None = None
        # Per driven optimizer index: optimizer steps taken, and one record per param group.
        self._steps: dict[int, int] = {}
        self._groups: dict[int, list[dict[str, Any]]] = {}
        self._loaded_total: int | None = None
        self._names: dict[int, str] = {}
        self._disabled = False
        # Per optimizer, the trainer's global_step when its last step was counted: LBFGS calls the hook once per
        # closure evaluation, several times for one optimizer step.
        self._counted_at: dict[int, int] = {}
        self._optimizers: list[Optimizer] = []

    @property
    def state_key(self) -> str:
        # The format of Lightning's Callback._generate_state_key, so checkpoints keep their keys.
        return f"{type(self).__qualname__}{dict(optimizers=self.optimizer_indices)!r}"

    # ------------------------------------------------------------------ setup
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Here, not in setup(): modules built in configure_model() exist only now; still before the first step.
        self._names = parameter_names(pl_module)
        if self.lr_multipliers:
            check_multiplier_keys(self.lr_multipliers, self._names.values(), type(self).__name__)
        if trainer.fast_dev_run:
            self._disabled = True
            rank_zero_info("WarmupDecay: fast_dev_run is a smoke test of a few steps; the schedule is not applied")
            return
        driven = self._driven_indices(trainer)
        if (
            not pl_module.automatic_optimization
            and len(driven) > 1
            and self.schedule.total_steps is None
            and self.schedule.needs_total_steps
        ):
            raise MisconfigurationException(
                f"WarmupDecay drives {len(driven)} manually stepped optimizers, whose step counts the Trainer cannot "
                "tell apart (its max_steps counts the steps of all of them); pass total_steps, the number of steps "
                "of each optimizer"
            )
        for config in trainer.lr_scheduler_configs:
            for index in driven:
                if config.scheduler.optimizer is trainer.optimizers[index]:
                    raise MisconfigurationException(
                        f"WarmupDecay drives optimizer {index} ({type(trainer.optimizers[index]).__name__}), but "
                        f"configure_optimizers also attaches {type(config.scheduler).__name__} to it; the two would "
                        "overwrite each other's learning rates. Remove that scheduler, or pass "
                        "WarmupDecay(optimizers=[...]) without this index"
                    )
        derived = trainer.estimated_stepping_batches
        total = self._loaded_total if self._loaded_total is not None else derived
        self.resolved = self.schedule.resolve(total)
        self._optimizers = list(trainer.optimizers)
        if self._loaded_total is not None and self.schedule.total_steps is None and derived != self._loaded_total:
            rank_zero_warn(
                f"WarmupDecay: the resumed run has {derived} optimizer steps but the checkpoint's schedule was built "
                f"for {self._loaded_total}; keeping {self._loaded_total} so the LR trajectory continues unchanged"
            )
        for index in driven:
            optimizer = trainer.optimizers[index]
            if self.lr_multipliers:
                split_groups_by_multiplier(optimizer, self._names, self.lr_multipliers)
            self._steps.setdefault(index, 0)
            self._groups.setdefault(index, [])
            self._register_groups(index, optimizer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._disabled:
            return
        if trainer.global_step and not any(self._steps.values()):
            # Resumed from a checkpoint saved without this callback: Lightning's step count is the best we have.
            rank_zero_warn(f"WarmupDecay: no saved state; continuing the schedule from global_step {trainer.global_step}")
            self._steps = dict.fromkeys(self._steps, trainer.global_step)
        self._apply_all(trainer)

    # ------------------------------------------------------------------ per step
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if not self._disabled:
            self._apply_all(trainer)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        index = None if self._disabled else self._index_of(trainer, optimizer)
        if index is None:
            return
        if self._counted_at.get(index) == trainer.global_step:
            self._steps[index] -= 1  # the same optimizer step again (LBFGS closure): same LR, counted once
        self._apply(index, trainer.optimizers[index])
        self._steps[index] += 1
        self._counted_at[index] = trainer.global_step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._disabled:
            self._apply_all(trainer)

    # ------------------------------------------------------------------ public
    def restart_warmup(
        self, optimizer_index: int, group_index: int, warmup_steps: int | None = None, base_lr: float | None = None
    ) -> None:
        """Give a param group a fresh warmup from the current step (e.g. when a gated encoder becomes trainable).

        Args:
            optimizer_index: index of the optimizer in ``trainer.optimizers``.
            group_index: index of the param group in that optimizer.
            warmup_steps: length of this warmup; default ``late_warmup_steps`` (or the schedule's warmup).
            base_lr: the group's new base LR (before its multiplier). Default: unchanged, except for a group gated
                with LR 0, whose base LR is then read from its ``lr`` now (set it before calling).
        """
        record = self._groups[optimizer_index][group_index]
        group = self._optimizers[optimizer_index].param_groups[group_index]
        if base_lr is None and record["base_lr"] == 0:
            base_lr = float(group["lr"])
        if base_lr is not None:
            self.set_base_lr(optimizer_index, group_index, base_lr)
        record["first_step"] = self._steps[optimizer_index]
        record["warmup_steps"] = self._late_warmup() if warmup_steps is None else int(warmup_steps)

    def set_base_lr(self, optimizer_index: int, group_index: int, base_lr: float) -> None:
        """Change a param group's base LR (before its ``lr_multipliers`` factor) from the current step on, without a
        new warmup; 0 gates the group (its LR stays 0). :class:`~ml_optim_plugins.StagedFinetuning` calls it when
        a stage changes a group's multiplier or freezes it.

        Raises:
            ValueError: for a negative base LR, or one below an absolute ``min_lr``.
        """
        record = self._groups[optimizer_index][group_index]
        record["base_lr"] = self.check_base_lr(optimizer_index, group_index, base_lr)

    def check_base_lr(self, optimizer_index: int, group_index: int, base_lr: float) -> float:
        """The group's base LR after its ``lr_multipliers`` factor, if ``base_lr`` would be valid for it (without
        changing anything).

        Raises:
            ValueError: for a negative base LR, or one below an absolute ``min_lr``.
        """
        group = self._optimizers[optimizer_index].param_groups[group_index]
        keys = set(group_keys(group, self._names, self.lr_multipliers))
        key = keys.pop() if len(keys) == 1 else None
        value = base_lr * (self.lr_multipliers[key] if key is not None else 1.0)
        assert self.resolved is not None
        self.resolved.check_base_lr(value, repr(self._groups[optimizer_index][group_index]["name"]))
        return value

    def drives(self, trainer: pl.Trainer, optimizer_index: int) -> bool:
        """Whether this callback sets the LRs of ``trainer.optimizers[optimizer_index]``."""
        return not trainer.fast_dev_run and optimizer_index in self._driven_indices(trainer)

    def current_lrs(self, optimizer_index: int = 0) -> dict[str, float]:
        """``{group name: LR}`` of a driven optimizer at its current step (what the next step will use)."""
        step = self._steps[optimizer_index]
        return {r["name"]: self._lr(r, step) for r in self._groups[optimizer_index]}

    # ------------------------------------------------------------------ internals
    def _driven_indices(self, trainer: pl.Trainer) -> list[int]:
        count = len(trainer.optimizers)
        if count == 0:
            raise MisconfigurationException("WarmupDecay needs an optimizer; configure_optimizers returned none")
        if self.optimizer_indices is None:
            return list(range(count))
        bad = [i for i in self.optimizer_indices if not 0 <= i < count]
        if bad:
            raise MisconfigurationException(f"WarmupDecay(optimizers={self.optimizer_indices}): {bad} out of range; "
                                            f"the module configures {count} optimizer(s)")
        return list(self.optimizer_indices)

    def _index_of(self, trainer: pl.Trainer, optimizer: Optimizer) -> int | None:
        raw = getattr(optimizer, "optimizer", optimizer)  # a LightningOptimizer wraps the torch one
        for index in self._groups:
            if trainer.optimizers[index] is raw or trainer.optimizers[index] is optimizer:
                return index
        return None

    def _late_warmup(self) -> int:
        assert self.resolved is not None
        return self.resolved.warmup_steps if self.late_warmup_steps is None else self.late_warmup_steps

    def _register_groups(self, index: int, optimizer: Optimizer) -> None:
        """Create a record for every group without one: base LR, first step, name."""
        records = self._groups[index]
        for group_index in range(len(optimizer.param_groups)):
            name = name_group(optimizer, group_index, self._names, self.lr_multipliers)
            if group_index < len(records):
                continue  # known group, or restored from a checkpoint
            group = optimizer.param_groups[group_index]
            keys = set(group_keys(group, self._names, self.lr_multipliers))
            if len(keys) > 1:
                raise ValueError(
                    f"WarmupDecay: param group {name!r} added during training holds parameters under different "
                    f"lr_multipliers keys {sorted(k or '(none)' for k in keys)}; add one group per module instead"
                )
            key = keys.pop() if keys else None
            base_lr = float(group["lr"]) * (self.lr_multipliers[key] if key is not None else 1.0)
            assert self.resolved is not None
            self.resolved.check_base_lr(base_lr, repr(name))
            step = self._steps[index]
            records.append(
                {"name": name, "base_lr": base_lr, "first_step": step, "warmup_steps": self._late_warmup() if step else 0}
            )

    def _lr(self, record: Mapping[str, Any], step: int) -> float:
        assert self.resolved is not None
        return self.resolved.group_lr(step, record["base_lr"], record["first_step"], record["warmup_steps"])

    def _apply(self, index: int, optimizer: Optimizer) -> None:
        if len(optimizer.param_groups) != len(self._groups[index]):
            self._register_groups(index, optimizer)
        step = self._steps[index]
        for group, record in zip(optimizer.param_groups, self._groups[index]):
            group["lr"] = self._lr(record, step)

    def _apply_all(self, trainer: pl.Trainer) -> None:
        for index in self._groups:
            self._apply(index, trainer.optimizers[index])

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {
            "total_steps": None if self.resolved is None else self.resolved.total_steps,
            "steps": {str(i): n for i, n in self._steps.items()},
            "groups": {str(i): [dict(r) for r in records] for i, records in self._groups.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded_total = state_dict["total_steps"]
        self._steps = {int(i): int(n) for i, n in state_dict["steps"].items()}
        self._groups = {int(i): [dict(r) for r in records] for i, records in state_dict["groups"].items()}
