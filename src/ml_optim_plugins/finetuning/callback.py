"""StagedFinetuning: the Lightning shell that runs a staged-finetuning plan (freeze, train the head, unfreeze)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from ml_optim_plugins.finetuning.activation_cache import ActivationCache
from ml_optim_plugins.finetuning.cache import FeatureCache
from ml_optim_plugins.finetuning.ddp import UnregisteredGradients
from ml_optim_plugins.finetuning.fit_checks import check_fit_start
from ml_optim_plugins.finetuning.freeze import FrozenModules
from ml_optim_plugins.finetuning.lr_gating import GatedParamGroups
from ml_optim_plugins.finetuning.plan import FinetuningPlan, check_stages, managed_selectors
from ml_optim_plugins.finetuning.stage import Stage, fresh_plateau
from ml_optim_plugins.finetuning.stage_caches import StageCaches
from ml_optim_plugins.lightning_internals import resumed_after_an_epochs_last_batch
from ml_optim_plugins.logger_metrics import log_to_loggers
from ml_optim_plugins.metric_names import FINETUNING_STAGE
from ml_optim_plugins.multimodal.contract import modality_module_names
from ml_optim_plugins.schedules import place_before_lr_drivers


class StagedFinetuning(Callback):
    """Freeze-then-finetune in stages: which modules train, at which LR multiplier, from which epoch, step or plateau.

    The *managed* modules (default: the contract's encoders) are frozen (``requires_grad=False``, kept in ``eval()``)
    or trainable as each :class:`~ml_optim_plugins.Stage` says; fusion and heads always train. The stages resolve to a
    :class:`~ml_optim_plugins.finetuning.FinetuningPlan` at ``setup``; the optimizers' groups are split by stage plan
    at ``on_fit_start``; a stage starts at the first micro-batch of an optimizer step. Override hooks:
    :meth:`managed_modules`, :meth:`build_stages`, :meth:`should_start_stage`, :meth:`on_stage_start`.

    Args:
        stages: the plan, first stage first (each a :class:`~ml_optim_plugins.Stage` or its arguments as a mapping).
        modules: selectors of the managed modules (modality names, module names or globs, with optional block
            selection); default: the contract's encoders.
        cache_features: serve an entirely frozen encoder's features from a
            :class:`~ml_optim_plugins.finetuning.FeatureCache` (needs ``encode_modality`` and sample ids).
        cache_dir: keep the caches in memory-mapped files under this directory (one subdirectory per process).
        verify_cache: recompute the first fully cached batch of each split and modality and raise if it differs.
        reset_early_stopping: reset the wait count of ``EarlyStopping`` callbacks at each stage boundary.
        cache_activations: when only an encoder's top blocks train, serve the input of its first trainable block from
            an :class:`~ml_optim_plugins.finetuning.ActivationCache` (needs a
            :class:`~ml_optim_plugins.multimodal.SplittableEncoder` and no image augmentation).

    Raises:
        ValueError: a bad plan (:func:`~ml_optim_plugins.finetuning.check_stages`) or selector, at construction or setup.
        MisconfigurationException: a plan this run cannot carry out (its LR control, optimizers, validation loop,
            strategy or caches), at setup or fit start; docs/finetuning.md names each case.

    Example::

        trainer = Trainer(max_epochs=6, callbacks=[
            StagedFinetuning([
                Stage(name="probe"),                                    # encoders frozen, head trains
                Stage(name="top", start_epoch=2, trainable=["text[-2:]", "image[-1]"], warmup_steps=50),
                Stage(name="all", start_epoch=4, trainable=["text", "image"], lr_multipliers={"text": 0.1}),
            ], cache_features=True),
            WarmupDecay(warmup_ratio=0.05, decay="cosine"),
        ])
    """

    def __init__(
        self,
        stages: Sequence[Stage | Mapping[str, Any]] | None = None,
        modules: Sequence[str] | None = None,
        cache_features: bool = False,
        cache_dir: str | Path | None = None,
        verify_cache: bool = True,
        reset_early_stopping: bool = True,
        cache_activations: bool = False,
    ) -> None:
        self.stages = [s if isinstance(s, Stage) else Stage(**s) for s in (stages or [])]
        self.reset_early_stopping, self.verify_cache = reset_early_stopping, verify_cache
        if stages is not None:
            check_stages(self.stages)
        self.modules = None if modules is None else list(modules)
        self.cache_features, self.cache_activations = cache_features, cache_activations
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.stage_index = 0
        self.boundaries: list[dict[str, Any]] = []
        self.plan: FinetuningPlan | None = None  # resolved at setup
        self.caches = StageCaches(cache_features, cache_activations, self.cache_dir, verify_cache)
        self._fitting = True  # False in validate / test runs, which must not take a checkpoint's stage state
        self._start_at_first_batch = False  # resumed where Lightning skips the next epoch's start hooks
        self._plateau = fresh_plateau()
        self._groups: GatedParamGroups | None = None
        self.unregistered = UnregisteredGradients()  # trainable parameters that DDP does not synchronise
        self.frozen = FrozenModules()  # the current stage's frozen modules, kept in eval()

    def managed_modules(self, pl_module: pl.LightningModule, modalities: Mapping[str, str]) -> list[str]:
        """Selectors of the modules that the stages freeze and unfreeze (``{modality: module name}`` from the
        contract); default ``modules``, else every modality. Called at ``setup``."""
        return managed_selectors(pl_module, self.modules, modalities)

    def build_stages(self, pl_module: pl.LightningModule, modalities: Mapping[str, str]) -> list[Stage]:
        """The stages to run; plans that depend on the model's structure (e.g. its number of blocks) override this.
        Called at ``setup``, after :meth:`managed_modules`."""
        return list(self.stages)

    def should_start_stage(self, trainer: pl.Trainer, index: int, *, at_epoch_start: bool) -> bool:
        """Whether stage ``index`` (the next one) starts now: at each epoch start and at the first micro-batch of each
        optimizer step. Default: its ``start_epoch``, ``start_step`` or plateau trigger."""
        return self._plan[index].is_due(trainer.current_epoch, trainer.global_step, at_epoch_start=at_epoch_start,
                                        plateau_pending=self._plateau["pending"])

    def on_stage_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, index: int) -> None:
        """Called once stage ``index``'s frozen set and LRs are applied: at fit start (the first stage, or the
        restored one) and at each stage boundary. Default: nothing."""

    @property
    def cache(self) -> FeatureCache | None:
        """The feature cache (``cache_features``; built at setup)."""
        return self.caches.features

    @property
    def activation_cache(self) -> ActivationCache | None:
        """The activation cache (``cache_activations``; built at setup)."""
        return self.caches.activations

    @property
    def stage(self) -> Stage:
        """The current stage."""
        return self._plan[self.stage_index]

    def stage_name(self, index: int | None = None) -> str:
        """Name of stage ``index`` (default: the current one)."""
        assert self.plan is not None
        return self.plan.stage_name(self.stage_index if index is None else index)

    _plan = property(lambda self: self.plan.stages if self.plan is not None else ())  # empty before setup

    def _enter(self, trainer: pl.Trainer, pl_module: pl.LightningModule, index: int, initial: bool = False) -> None:
        assert self.plan is not None and self._groups is not None
        previous, trainable = self.plan.trainable[self.stage_index], self.plan.trainable[index]
        self.stage_index = index
        self.frozen.apply(pl_module, self.plan.params, self.plan.managed, trainable,
                          extra=self.caches.follow(pl_module, trainable))
        self._groups.enter(index, previous, initial)
        self.unregistered.follow(self.plan, trainable)
        if not initial:  # at fit start: fresh since setup, or restored from the checkpoint
            self._plateau = fresh_plateau()
        if not (initial and self.boundaries):  # resumed: the boundary is on record
            epoch, step = trainer.current_epoch, trainer.global_step
            self.boundaries.append({"stage": index, "name": self.stage_name(index), "epoch": epoch, "step": step})
            rank_zero_info(self.plan.describe(index, epoch, step) + self.caches.describe())
            if not initial:
                log_to_loggers(trainer, {FINETUNING_STAGE: index})
                for callback in trainer.early_stopping_callbacks if self.reset_early_stopping else []:
                    callback.wait_count = 0
        self.on_stage_start(trainer, pl_module, index)

    def _advance(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *, at_epoch_start: bool,
                 step_start: bool = True) -> None:
        """Enter every stage that is due (at a step's start), then keep the frozen modules in eval for training."""
        while step_start and self.stage_index + 1 < len(self._plan) and self.should_start_stage(
            trainer, self.stage_index + 1, at_epoch_start=at_epoch_start
        ):
            self._enter(trainer, pl_module, self.stage_index + 1)
        self.frozen.keep_in_eval()
        self.caches.set_split("train")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._fitting = stage == "fit"
        if stage != "fit":
            return
        self.stage_index, self.boundaries = 0, []  # a checkpoint's are loaded after setup
        modalities = modality_module_names(pl_module)
        managed = self.managed_modules(pl_module, modalities)
        self.plan = FinetuningPlan.resolve(pl_module, self.build_stages(pl_module, modalities), managed, modalities)
        self._plateau = fresh_plateau()  # a checkpoint's is loaded after setup
        place_before_lr_drivers(trainer.callbacks, self)  # it splits the groups before the driver registers them
        self.caches = StageCaches(self.cache_features, self.cache_activations, self.cache_dir, self.verify_cache)
        self.caches.setup(trainer, pl_module, self.plan)
        # Before DDP wraps the model: it registers the first stage's trainable parameters, also when resuming (the
        # restored stage is entered at on_fit_start), so fresh and resumed runs synchronise the same way.
        self.frozen.apply(pl_module, self.plan.params, self.plan.managed, self.plan.trainable[0], set_modes=False)
        for warning in self.plan.random_frozen_encoders(pl_module):
            rank_zero_warn(warning)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.caches.teardown(pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.plan is not None
        check_fit_start(trainer, pl_module, self.plan, self.stage_index)
        self.unregistered.attach(trainer.strategy, self.plan)
        self._groups = GatedParamGroups.from_trainer(self.plan, trainer)
        self._enter(trainer, pl_module, self.stage_index, initial=True)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self._groups is not None
        self._groups.check_base_lrs()  # the drivers have registered the groups now, before the first step
        self._start_at_first_batch = resumed_after_an_epochs_last_batch(trainer)  # no epoch-start hooks follow

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._advance(trainer, pl_module, at_epoch_start=True)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._start_at_first_batch:
            self._start_at_first_batch = False
            self._advance(trainer, pl_module, at_epoch_start=True)
        # Only at the first micro-batch of an optimizer step: all its micro-batches see the same frozen set.
        self._advance(trainer, pl_module, at_epoch_start=False,
                      step_start=batch_idx % max(1, trainer.accumulate_grad_batches) == 0)

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.unregistered.after_backward(trainer, pl_module)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self.unregistered.before_optimizer_step(trainer, pl_module, optimizer)

    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self.caches.set_split("val", dataloader_idx)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.plan is None or trainer.sanity_checking:
            return
        plateau = self.plan.plateau_after_validation(self.stage_index + 1, self._plateau, trainer.callback_metrics)
        if plateau is not None:  # under DDP: the next stage starts on every rank when it is due on any
            plateau["pending"] = bool(trainer.strategy.reduce_boolean_decision(plateau["pending"], all=False))
            self._plateau = plateau

    def state_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage_index,
            "stage_name": self.stage_name() if self._plan else None,
            "boundaries": [dict(b) for b in self.boundaries],
            "plateau": dict(self._plateau),
            **self.caches.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not self._fitting:
            return  # validate / test from a checkpoint: the stages of the run that made it stay as they are
        self.boundaries = [dict(b) for b in state_dict["boundaries"]]
        index = int(state_dict["stage"])
        if self._plan and index >= len(self._plan):
            raise ValueError(f"the checkpoint is in stage {index}, but this plan has {len(self._plan)} stages")
        self.stage_index = index  # entered at on_fit_start
        self._plateau = dict(state_dict["plateau"])
