"""What :class:`~ml_optim_plugins.StagedFinetuning` checks of the Trainer at fit start, before the first step: the
strategy, the optimizers, the validation loop and the run's length against the plan."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from ml_optim_plugins.finetuning.ddp import check_strategy
from ml_optim_plugins.finetuning.plan import FinetuningPlan
from ml_optim_plugins.lightning_internals import val_dataloader_defined


def check_fit_start(trainer: pl.Trainer, pl_module: pl.LightningModule, plan: FinetuningPlan, stage: int) -> None:
    """Raise for what would make the plan fail or do nothing, warn about a stage after ``stage`` (the one the run
    starts or resumes in) that the run ends before.

    Raises:
        MisconfigurationException: a sharding strategy, a parameter that a later stage trains in no optimizer, a
            ``monitor`` stage in a run without validation.
    """
    check_strategy(trainer.strategy)
    plan.check_optimized({id(p) for o in trainer.optimizers for g in o.param_groups for p in g["params"]})
    plan.check_validation(is_overridden("validation_step", pl_module) and trainer.limit_val_batches != 0
                          and val_dataloader_defined(trainer))
    warning = plan.unreached_stage(trainer.max_epochs, trainer.max_steps, after=stage)
    if warning is not None:
        rank_zero_warn(warning)
