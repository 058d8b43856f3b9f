"""StagedFinetuning: freeze pretrained encoders, train the head, then unfreeze them stage by stage."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ml_optim_plugins.evaluation import log_to_loggers, mean_over_ranks
from ml_optim_plugins.finetuning.blocks import encoder_blocks, parse_selector, select_parameters
from ml_optim_plugins.finetuning.cache import FeatureCache
from ml_optim_plugins.finetuning.stage import Stage
from ml_optim_plugins.hyperparameters import check_number
from ml_optim_plugins.schedules.callback import WarmupDecay
from ml_optim_plugins.schedules.param_groups import module_label, name_group, parameter_names, split_groups

#: Param-group key holding a group's base LR before stage multipliers (saved with the optimizer's state).
BASE_LR_KEY = "staged_base_lr"


def _modality_modules(pl_module: nn.Module) -> dict[str, str]:
    """``{modality: qualified module name}`` from the modality contract (empty without it)."""
    encoders = getattr(pl_module, "modality_encoders", None)
    if not callable(encoders):
        return {}
    names = {id(m): name for name, m in pl_module.named_modules()}
    return {modality: names[id(encoder)] for modality, encoder in encoders().items() if id(encoder) in names}


def _has_validation(trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
    """Whether this fit will run validation (a validation step, batches, and a validation dataloader)."""
    if not is_overridden("validation_step", pl_module) or trainer.limit_val_batches == 0:
        return False
    source = getattr(getattr(trainer.fit_loop.epoch_loop, "val_loop", None), "_data_source", None)
    return source is None or source.is_defined()  # Lightning internals: if they change, assume it will


# Strategies that shard parameters across processes (the callback needs whole parameters on every rank).
_SHARDED_STRATEGIES = (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)


class StagedFinetuning(Callback):
    """Freeze-then-finetune in stages: which modules train, at which LR multiplier, from which epoch, step or plateau.

    The *managed* modules (default: every encoder of the modality contract; or ``modules``) are frozen or trainable
    as each :class:`~ml_optim_plugins.Stage` says; everything else (fusion, heads) always trains. Frozen means:

    * ``requires_grad=False``: no gradient is computed or stored for it, so frozen stages are fast, and the optimizer
      skips it (no weight decay, no momentum);
    * kept in ``eval()`` (BatchNorm statistics fixed, dropout off) even after Lightning puts the model in train mode,
      so its features are those of the pretrained network;
    * with ``cache_features=True``, an entirely frozen encoder's features are computed once per sample and reused
      (:class:`~ml_optim_plugins.FeatureCache`), invalidated when it is unfrozen.

    Design: every param group exists from the start and is *gated*. At ``on_fit_start`` the optimizer's groups are
    split so that parameters following different stage plans are in different groups, named after the stage in which
    they start training (e.g. ``encoders.text/finetune`` and ``encoders.text/frozen``); a frozen group has LR 0. With
    :class:`~ml_optim_plugins.WarmupDecay` driving the optimizer, each stage sets the groups' base LRs there (base LR x
    stage multiplier) and gives newly trainable groups their own warmup; without a scheduler it sets the LRs itself.
    So the optimizer's shape never changes: ``LearningRateMonitor`` keys are stable, checkpoints load, and
    ``state_dict`` (stage, boundaries, plateau counters) makes a resumed run continue in the same stage with the same
    LRs.

    DDP: the modules frozen when DDP wraps the model are not registered with DDP's gradient reducer (Lightning issue
    20340: they would never train in sync once unfrozen). This callback all-reduces (averages) the gradients of those
    parameters itself once they are trainable, after the last backward of each optimizer step, so every rank applies
    the same update; plateau triggers are decided jointly by all ranks. Re-freezing a parameter that DDP syncs (one
    trainable in the first stage) needs ``DDPStrategy(find_unused_parameters=True)``. FSDP is not supported.

    Args:
        stages: the plan, first stage first (a :class:`~ml_optim_plugins.Stage` or its arguments as a mapping).
        modules: selectors of the managed modules (modality names, module names or globs, with optional block
            selection); default: the contract's encoders.
        cache_features: cache the features of encoders while they are entirely frozen; needs a module that encodes
            through :meth:`~ml_optim_plugins.ModalityAwareMixin.encode_modality` and batches with sample ids, and
            deterministic inputs (no random augmentation; checked on the first cached batch).
        cache_dir: keep the cache in memory-mapped files under this directory (one subdirectory per process)
            instead of in memory.
        verify_cache: recompute the first fully cached batch of each split and modality and raise if it differs.
        reset_early_stopping: at each stage boundary, reset the wait count of the Trainer's ``EarlyStopping``
            callbacks, so a new stage gets their full patience (a probe that plateaued does not stop the run just
            after the encoders were unfrozen); the best score is kept. A patience that runs out within a stage still
            stops the run: give ``EarlyStopping`` a patience of at least the epochs of the longest stage before the
            last (and more than a plateau trigger's patience).

    Raises:
        ValueError: an empty plan, a later stage without a trigger, triggers out of order, two stages that start
            together (the first would never train), a selector that matches nothing, or a stage that trains a module
            outside ``modules`` (at setup, before any step).
        MisconfigurationException: a stage needs a warmup or LR multipliers, but no
            :class:`~ml_optim_plugins.WarmupDecay` drives the optimizer and a foreign scheduler owns its LRs; a staged
            parameter in no optimizer; a ``monitor`` stage without validation; FSDP; a re-freeze under DDP without
            ``find_unused_parameters`` (all at fit start).

    Example::

        from lightning.pytorch import Trainer
        from ml_optim_plugins import Stage, StagedFinetuning, WarmupDecay

        trainer = Trainer(max_epochs=6, callbacks=[
            StagedFinetuning([
                Stage(name="probe"),                                    # encoders frozen, head trains
                Stage(name="top", start_epoch=2, trainable=["text[-2:]", "image[-1]"], warmup_steps=50),
                Stage(name="all", start_epoch=4, trainable=["text", "image"],
                      lr_multipliers={"text": 0.1, "image": 0.3}),
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
    ) -> None:
        self.stages = [s if isinstance(s, Stage) else Stage(**s) for s in (stages or [])]
        self.reset_early_stopping = reset_early_stopping
        if stages is not None:
            self._check_plan(self.stages)
        self.modules = None if modules is None else list(modules)
        self.cache_features = cache_features
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.verify_cache = verify_cache
        self.stage_index = 0
        self.boundaries: list[dict[str, Any]] = []
        self._fitting = True  # False in validate / test runs, which must not take a checkpoint's stage state
        self.cache: FeatureCache | None = None
        self._plateau = {"best": None, "wait": 0, "pending": False}
        self._module: pl.LightningModule | None = None
        self._plan: list[Stage] = []
        self._names: dict[int, str] = {}
        self._params: dict[int, nn.Parameter] = {}
        self._managed: set[int] = set()
        self._trainable: list[set[int]] = []
        self._multipliers: list[dict[int, float]] = []
        self._modalities: dict[str, str] = {}
        self._registered: set[int] | None = None
        self._unsynced: list[nn.Parameter] = []
        self._eval_modules: list[nn.Module] = []
        self._restored_plateau: dict[str, Any] | None = None

    # ------------------------------------------------------------------ plan
    @staticmethod
    def _check_plan(stages: Sequence[Stage]) -> None:
        if not stages:
            raise ValueError("StagedFinetuning needs at least one Stage")
        first = stages[0]
        if first.monitor is not None or (first.start_epoch or 0) > 0 or (first.start_step or 0) > 0:
            raise ValueError(f"the first stage starts with training; it cannot have a trigger: {first}")
        last_epoch, last_step = 0, 0
        for i, stage in enumerate(stages[1:], start=1):
            if not stage.has_trigger:
                raise ValueError(f"stage {i} ({stage.name or 'unnamed'}) has no trigger: give start_epoch, start_step "
                                 "or monitor")
            previous = stages[i - 1]
            for unit in ("epoch", "step"):
                start, before = getattr(stage, f"start_{unit}"), getattr(previous, f"start_{unit}")
                other_unit = "step" if unit == "epoch" else "epoch"
                other = previous.monitor is not None or getattr(previous, f"start_{other_unit}") is not None
                if start is not None and start == before and not other:
                    raise ValueError(
                        f"stages {i - 1} ({previous.name or 'unnamed'}) and {i} ({stage.name or 'unnamed'}) both start "
                        f"at {unit} {start}, so stage {i - 1} never trains (the later one takes over at once); give "
                        f"stage {i} a later start_{unit}, or drop stage {i - 1}"
                    )
            if stage.start_epoch is not None:
                if stage.start_epoch < last_epoch:
                    raise ValueError(f"stage {i} starts at epoch {stage.start_epoch}, before an earlier stage "
                                     f"(epoch {last_epoch}); stages run in order")
                last_epoch = stage.start_epoch
            if stage.start_step is not None:
                if stage.start_step < last_step:
                    raise ValueError(f"stage {i} starts at step {stage.start_step}, before an earlier stage "
                                     f"(step {last_step}); stages run in order")
                last_step = stage.start_step

    def build_stages(self, pl_module: pl.LightningModule, modalities: Mapping[str, str]) -> list[Stage]:
        """The stages to run; plans that depend on the model's structure (e.g. its number of blocks) override this.
        Called at ``setup``."""
        return list(self.stages)

    @property
    def stage(self) -> Stage:
        """The current stage."""
        return self._plan[self.stage_index]

    def stage_name(self, index: int | None = None) -> str:
        """Name of stage ``index`` (default: the current one)."""
        index = self.stage_index if index is None else index
        return self._plan[index].name or f"stage{index}"

    def _select(self, selector: str) -> set[int]:
        assert self._module is not None
        by_name = {name: id(p) for name, p in self._module.named_parameters()}
        return {by_name[name] for name in select_parameters(self._module, selector, self._modalities) if name in by_name}

    def _resolve(self, pl_module: pl.LightningModule) -> None:
        self._module = pl_module
        self._modalities = _modality_modules(pl_module)
        self._names = parameter_names(pl_module)
        self._params = {id(p): p for p in pl_module.parameters()}
        if self.modules is not None:
            selectors = self.modules
        elif self._modalities:
            selectors = list(self._modalities)
        else:
            raise ValueError(
                f"StagedFinetuning: {type(pl_module).__name__} has no modality contract (modality_encoders()); name the "
                "modules to freeze and unfreeze with modules=[...]"
            )
        plan = self.build_stages(pl_module, self._modalities)
        self._check_plan(plan)
        self._plan = plan
        self._managed = set().union(*(self._select(s) for s in selectors))
        batchnorm = {id(p) for m in pl_module.modules() if isinstance(m, _BatchNorm) for p in m.parameters()}
        self._trainable, self._multipliers = [], []
        for i, stage in enumerate(plan):
            trainable = set().union(*(self._select(s) for s in stage.trainable)) if stage.trainable else set()
            outside = trainable - self._managed
            if outside:
                example = sorted(self._names[p] for p in outside)[:3]
                raise ValueError(
                    f"stage {i} ({self.stage_name(i)}) makes trainable parameters that StagedFinetuning does not manage "
                    f"(e.g. {example}); they always train. Add their module to modules=[...] to stage them"
                )
            if not stage.train_bn:
                trainable -= batchnorm
            self._trainable.append(trainable | (set(self._params) - self._managed))
            multipliers: dict[int, tuple[int, float]] = {}
            for selector, factor in stage.lr_multipliers.items():
                chosen = self._select(selector)
                for pid in chosen:  # the selector covering the fewest parameters wins
                    if pid not in multipliers or len(chosen) < multipliers[pid][0]:
                        multipliers[pid] = (len(chosen), factor)
            self._multipliers.append({pid: factor for pid, (_, factor) in multipliers.items()})

    def _trajectory(self, pid: int) -> tuple[tuple[bool, float], ...]:
        return tuple((pid in self._trainable[i], self._multipliers[i].get(pid, 1.0)) for i in range(len(self._plan)))

    # ------------------------------------------------------------------ freezing
    def _apply_freeze(self, index: int) -> None:
        trainable = self._trainable[index]
        for pid in self._managed:
            p = self._params[pid]
            p.requires_grad_(pid in trainable)
            if pid not in trainable:
                p.grad = None
        assert self._module is not None
        # The largest modules whose parameters are all managed and frozen stay in eval(); likewise frozen BatchNorm.
        frozen = self._managed - trainable
        chosen: list[nn.Module] = []
        covered: set[int] = set()
        for _, module in self._module.named_modules():
            if id(module) in covered:
                continue
            ids = {id(p) for p in module.parameters()}
            if ids and ids <= frozen:
                chosen.append(module)
                covered.update(id(m) for m in module.modules())
        self._eval_modules = chosen

    def _keep_frozen_in_eval(self) -> None:
        for module in self._eval_modules:
            if module.training:
                module.eval()

    # ------------------------------------------------------------------ hooks: setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._fitting = stage == "fit"
        if stage != "fit":
            return
        self._resolve(pl_module)
        # LR bookkeeping: this callback splits and gates the param groups before WarmupDecay registers them.
        callbacks = trainer.callbacks
        first_warmup = next((i for i, c in enumerate(callbacks) if isinstance(c, WarmupDecay)), None)
        if first_warmup is not None and callbacks.index(self) > first_warmup:
            callbacks.remove(self)
            callbacks.insert(first_warmup, self)
        if self.cache_features:
            if not callable(getattr(pl_module, "encode_modality", None)) or not hasattr(pl_module, "feature_cache"):
                raise MisconfigurationException(
                    f"StagedFinetuning(cache_features=True) needs a module that encodes through encode_modality() and "
                    f"has a feature_cache attribute (ModalityAwareMixin); {type(pl_module).__name__} has not"
                )
            directory = None if self.cache_dir is None else self.cache_dir / f"rank{trainer.global_rank}"
            self.cache = FeatureCache(directory, verify=self.verify_cache)
            pl_module.feature_cache = self.cache
        # Before DDP wraps the model: it registers the first stage's trainable parameters, also when resuming (the
        # restored stage is entered at on_fit_start), so fresh and resumed runs synchronise the same way.
        self._apply_freeze(0)
        self._warn_random_frozen_encoders(pl_module)

    def _warn_random_frozen_encoders(self, pl_module: pl.LightningModule) -> None:
        """Warn when the first stage freezes an encoder that says it has no pretrained weights
        (``pretrained_weights = False``, as :class:`~ml_optim_plugins.TimmImageEncoder` without weights does)."""
        modules = dict(pl_module.named_modules())
        for modality, name in self._modalities.items():
            encoder = modules[name]
            frozen = {id(p) for p in encoder.parameters()} & (self._managed - self._trainable[0])
            if frozen and getattr(encoder, "pretrained_weights", None) is False:
                rank_zero_warn(
                    f"StagedFinetuning freezes the {modality!r} encoder ({type(encoder).__name__}), which has random "
                    "weights: kept in eval() it gives the head fixed random features until it is unfrozen. Staging is "
                    "meant for pretrained encoders: load weights (pretrained='packaged', checkpoint_path=...), or "
                    "leave this encoder out of modules=[...] so that it always trains"
                )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.cache is not None and getattr(pl_module, "feature_cache", None) is self.cache:
            pl_module.feature_cache = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if isinstance(trainer.strategy, _SHARDED_STRATEGIES):
            # Sharded parameters: requires_grad, param-group splits and the feature cache assume whole tensors.
            raise MisconfigurationException(
                f"StagedFinetuning does not support {type(trainer.strategy).__name__} (it shards parameters); use DDP "
                "(strategy='ddp') or one device"
            )
        self._registered = None
        model = trainer.strategy.model
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            # What DDP registered when it wrapped the model: the first stage's trainable parameters (see setup).
            self._registered = set(self._trainable[0])
            find_unused = bool(getattr(trainer.strategy, "_ddp_kwargs", {}).get("find_unused_parameters", False))
            for i in range(1, len(self._plan)):
                refrozen = self._registered - self._trainable[i]
                if refrozen and not find_unused:
                    example = sorted(self._names[p] for p in refrozen)[:3]
                    raise MisconfigurationException(
                        f"stage {i} ({self.stage_name(i)}) freezes parameters that DDP already synchronises (e.g. "
                        f"{example}); DDP then waits for their gradients forever. Use "
                        "DDPStrategy(find_unused_parameters=True), or keep them trainable"
                    )
        in_optimizers = {id(p) for optimizer in trainer.optimizers for group in optimizer.param_groups
                         for p in group["params"]}
        never = {pid for trainable in self._trainable[1:] for pid in trainable} - in_optimizers
        if never:
            example = sorted(self._names[p] for p in never)[:3]
            raise MisconfigurationException(
                f"StagedFinetuning: parameters that a later stage trains are in no optimizer (e.g. {example}), so they "
                "would never train. configure_optimizers probably kept only parameters with requires_grad=True, which "
                "the frozen ones are not at that point; give the optimizer every parameter (frozen ones are skipped)"
            )
        if any(s.monitor is not None for s in self._plan) and not _has_validation(trainer, pl_module):
            raise MisconfigurationException(
                "StagedFinetuning: a stage starts on a validation metric (monitor), but this run has no validation "
                "loop; add validation data or use start_epoch / start_step"
            )
        self._warn_unreached_stages(trainer)
        self._prepare_optimizers(trainer)
        self._enter(trainer, self.stage_index, initial=True)

    def _warn_unreached_stages(self, trainer: pl.Trainer) -> None:
        """Warn about stages that this run ends before (``max_epochs`` / ``max_steps`` at or below their start), the
        first thing a shortened trial run does: the encoders would silently never train."""
        limits = {"epoch": trainer.max_epochs if (trainer.max_epochs or -1) >= 0 else None,
                  "step": trainer.max_steps if trainer.max_steps >= 0 else None}
        for i in range(max(1, self.stage_index + 1), len(self._plan)):
            stage = self._plan[i]
            starts = {unit: getattr(stage, f"start_{unit}") for unit in limits}
            late = {unit: start for unit, start in starts.items()
                    if start is not None and limits[unit] is not None and start >= limits[unit]}
            if not late or stage.monitor is not None or len(late) < sum(v is not None for v in starts.values()):
                continue
            unit, start = next(iter(late.items()))
            newly = sorted({self._names[p].rsplit(".", 1)[0] for p in self._trainable[i] - self._trainable[i - 1]})
            rank_zero_warn(
                f"StagedFinetuning: stage {i} ({self.stage_name(i)}) starts at {unit} {start}, but max_{unit}s="
                f"{limits[unit]} ends the run first, so it never runs"
                + (f" and {newly[:3]} never train" if newly else "")
                + f". Raise max_{unit}s above {start}, or start the stage earlier (LinearProbeFinetune: probe_epochs; "
                "GradualUnfreezing: epochs_per_stage)"
            )
            return

    def _prepare_optimizers(self, trainer: pl.Trainer) -> None:
        scheduled = {id(config.scheduler.optimizer) for config in trainer.lr_scheduler_configs}
        needs_lr_control = any(s.warmup_steps or s.lr_multipliers for s in self._plan[1:]) or bool(
            self._plan[0].lr_multipliers
        )
        for index, optimizer in enumerate(trainer.optimizers):
            driven = self._warmup_for(trainer, index) is not None
            foreign = not driven and id(optimizer) in scheduled  # a scheduler from configure_optimizers owns the LRs
            if foreign and needs_lr_control:
                raise MisconfigurationException(
                    f"StagedFinetuning: a stage sets LR multipliers or a warmup, but optimizer {index} "
                    f"({type(optimizer).__name__}) has a LR scheduler from configure_optimizers, which owns its LRs. "
                    "Drive it with ml_optim_plugins.WarmupDecay instead, or drop lr_multipliers / warmup_steps"
                )
            if not driven and not trainer.fast_dev_run and any(s.warmup_steps for s in self._plan):
                raise MisconfigurationException(
                    "StagedFinetuning: a stage asks for warmup_steps, which needs ml_optim_plugins.WarmupDecay in the "
                    "Trainer's callbacks (it warms up each newly trainable group)"
                )
            for group_index in range(len(optimizer.param_groups)):  # unnamed groups: parts need a unique prefix
                name_group(optimizer, group_index, self._names, {})
            if foreign:
                # Freezing alone: frozen parameters get no gradient, so the optimizer skips them; the groups (which the
                # scheduler was built for) stay as they are, and their LRs are the scheduler's (issue 17).
                continue
            split_groups(optimizer, self._names, self._group_labels)
            for group in optimizer.param_groups:
                group.setdefault(BASE_LR_KEY, float(group.get("initial_lr", group["lr"])))

    def _group_labels(self, group: Mapping[str, Any]) -> list[str | None]:
        """One label per parameter of ``group``: equal for parameters with the same plan, so they share a group.

        A part is named after the stage in which it first trains (``"frozen"`` if never), plus its LR multiplier in
        that stage where two parts would read the same: ``encoders.text/frozen``, ``encoders.text/finetune``,
        ``encoders.text/stage1x0.5``. In a group that no module names (``pg1``: say one group for the whole model), the
        part's module comes first: ``pg1/fusion.head/probe``, ``pg1/encoders/finetune``.
        """
        params = group["params"]
        plans = [self._trajectory(id(p)) for p in params]
        if len(set(plans)) <= 1:
            return [None] * len(params)
        prefix = f"{group['name']}." if "name" in group else None
        bases: dict[tuple, str] = {}
        first: dict[tuple, int | None] = {}
        for plan in dict.fromkeys(plans):
            first[plan] = next((i for i, (on, _) in enumerate(plan) if on), None)
            names = [self._names[id(p)] for p, other in zip(params, plans) if other == plan]
            base = "frozen" if first[plan] is None else self.stage_name(first[plan])
            if prefix is None or not all(name.startswith(prefix) for name in names):
                base = f"{module_label(names)}/{base}"
            bases[plan] = base
        labels: dict[tuple, str] = {}
        for plan, base in bases.items():
            label, start = base, first[plan]
            if start is not None and list(bases.values()).count(base) > 1:
                label += f"x{plan[start][1]:.3g}"
            while label in labels.values():
                label += "+"
            labels[plan] = label
        return [labels[plan] for plan in plans]

    def _staged_groups(self, trainer: pl.Trainer) -> Iterator[tuple[int, WarmupDecay | None, int, dict[str, Any], int]]:
        """``(optimizer index, its WarmupDecay or None, group index, group, id of the group's first parameter)`` for
        every group this callback prepared; all parameters of a group share one stage plan, the first one's."""
        for opt_index, optimizer in enumerate(trainer.optimizers):
            warmup = self._warmup_for(trainer, opt_index)
            for group_index, group in enumerate(optimizer.param_groups):
                first = next((id(p) for p in group["params"]), None)
                if first is not None and BASE_LR_KEY in group:
                    yield opt_index, warmup, group_index, group, first

    def _stage_base_lr(self, group: Mapping[str, Any], first: int, stage: int) -> float:
        """The group's base LR in ``stage``: its configured LR times the stage's multiplier, 0 while frozen."""
        if first not in self._trainable[stage]:
            return 0.0
        return group[BASE_LR_KEY] * self._multipliers[stage].get(first, 1.0)

    @staticmethod
    def _warmup_for(trainer: pl.Trainer, index: int) -> WarmupDecay | None:
        for callback in trainer.callbacks:
            if isinstance(callback, WarmupDecay) and callback.drives(trainer, index):
                return callback
        return None

    # ------------------------------------------------------------------ stage changes
    def _enter(self, trainer: pl.Trainer, index: int, initial: bool = False) -> None:
        previous = self._trainable[self.stage_index]
        was_eval = self._eval_modules
        self.stage_index = index
        self._apply_freeze(index)
        assert self._module is not None
        for module in was_eval:  # unfrozen modules follow the model's mode again
            module.train(self._module.training)
        self._keep_frozen_in_eval()
        trainable, stage = self._trainable[index], self._plan[index]
        scheduled = {id(config.scheduler.optimizer) for config in trainer.lr_scheduler_configs}
        for opt_index, warmup, group_index, group, first in self._staged_groups(trainer):
            base = self._stage_base_lr(group, first, index)
            if warmup is not None and not initial:
                if first in trainable and first not in previous:
                    warmup.restart_warmup(opt_index, group_index, stage.warmup_steps, base_lr=base)
                else:
                    warmup.set_base_lr(opt_index, group_index, base)
            elif warmup is not None or id(trainer.optimizers[opt_index]) not in scheduled:
                group["lr"] = base  # WarmupDecay (registering after this) reads it as the group's base LR
        self._unsynced = []
        if self._registered is not None:
            self._unsynced = [self._params[p] for p in sorted(trainable - self._registered, key=self._names.get)]
        self._update_cache()
        self._plateau = {"best": None, "wait": 0, "pending": False}
        if initial and self.boundaries:
            return  # resumed: the boundary is on record
        self.boundaries.append(
            {"stage": index, "name": self.stage_name(index), "epoch": trainer.current_epoch, "step": trainer.global_step}
        )
        frozen = sorted({self._names[p].rsplit(".", 1)[0] for p in self._managed - trainable})
        trained = len(self._managed & trainable)
        rank_zero_info(
            f"StagedFinetuning: stage {index} '{self.stage_name(index)}' from epoch {trainer.current_epoch}, step "
            f"{trainer.global_step}: {trained} of {len(self._managed)} managed tensors trainable"
            + (f"; frozen modules include {frozen[:3]}" if frozen else "")
        )
        if not initial:
            log_to_loggers(trainer, {"finetuning/stage": index})
            if self.reset_early_stopping:
                for callback in trainer.early_stopping_callbacks:
                    callback.wait_count = 0

    def _update_cache(self) -> None:
        if self.cache is None:
            return
        assert self._module is not None
        encoders = self._module.modality_encoders()
        trainable = self._trainable[self.stage_index]
        for modality, encoder in encoders.items():
            ids = {id(p) for p in encoder.parameters()}
            if ids and not ids & trainable:
                self.cache.activate(modality, encoder)
            elif self.cache.is_active(modality):
                self.cache.invalidate(modality)

    def _advance(self, trainer: pl.Trainer, *, at_epoch_start: bool) -> None:
        while self.stage_index + 1 < len(self._plan):
            nxt = self._plan[self.stage_index + 1]
            fire = (
                (nxt.start_epoch is not None and trainer.current_epoch >= nxt.start_epoch
                 and (at_epoch_start or trainer.current_epoch > nxt.start_epoch))
                or (nxt.start_step is not None and trainer.global_step >= nxt.start_step)
                or (nxt.monitor is not None and self._plateau["pending"])
            )
            if not fire:
                return
            self._enter(trainer, self.stage_index + 1)

    # ------------------------------------------------------------------ hooks: training
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._advance(trainer, at_epoch_start=True)
        self._keep_frozen_in_eval()
        if self.cache is not None:
            self.cache.split = "train"

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        # Only at the first micro-batch of an optimizer step: all its micro-batches see the same frozen set.
        if batch_idx % max(1, trainer.accumulate_grad_batches) == 0:
            self._advance(trainer, at_epoch_start=False)
        self._keep_frozen_in_eval()
        if self.cache is not None:
            self.cache.split = "train"

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not pl_module.automatic_optimization or trainer.fit_loop.epoch_loop._should_accumulate():
            return  # DDP also waits for the last micro-batch (no_sync); so do we
        self._sync_gradients(trainer, self._unsynced)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if pl_module.automatic_optimization or not self._unsynced:
            return
        # Manual optimization: once per step of this optimizer, for its own parameters.
        raw = getattr(optimizer, "optimizer", optimizer)
        own = {id(p) for group in raw.param_groups for p in group["params"]}
        self._sync_gradients(trainer, [p for p in self._unsynced if id(p) in own])

    def _sync_gradients(self, trainer: pl.Trainer, params: list[nn.Parameter]) -> None:
        """Average the gradients of trainable ``params`` over the DDP ranks, like DDP does for the ones it
        registered; a parameter without a gradient on every rank keeps none (so the optimizer skips it)."""
        params = [p for p in params if p.requires_grad]
        if trainer.world_size < 2 or not params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        has_grad = torch.tensor([float(p.grad is not None) for p in params], device=grads[0].device)
        *averaged, any_grad = mean_over_ranks(trainer.strategy, [*grads, has_grad])
        for p, grad, flag in zip(params, averaged, any_grad.tolist()):
            p.grad = grad if flag > 0 else None

    # ------------------------------------------------------------------ hooks: evaluation
    def _set_split(self, split: str, dataloader_idx: int) -> None:
        if self.cache is not None:
            self.cache.split = split if dataloader_idx == 0 else f"{split}{dataloader_idx}"

    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._set_split("val", dataloader_idx)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.stage_index + 1 >= len(self._plan):
            return
        nxt = self._plan[self.stage_index + 1]
        if nxt.monitor is None:
            return
        value = trainer.callback_metrics.get(nxt.monitor)
        if value is None:
            raise MisconfigurationException(
                f"stage {self.stage_index + 1} ({self.stage_name(self.stage_index + 1)}) monitors {nxt.monitor!r}, "
                f"which was not logged; logged metrics: {sorted(trainer.callback_metrics)}"
            )
        value = float(value)
        best = self._plateau["best"]
        improved = best is None or (
            value < best - nxt.min_delta if nxt.mode == "min" else value > best + nxt.min_delta
        )
        if improved and math.isfinite(value):
            self._plateau.update(best=value, wait=0)
        else:
            self._plateau["wait"] += 1
        # Under DDP each rank has its own value unless it was logged with sync_dist: the stage starts on every rank
        # when it starts on any (as EarlyStopping decides), so the ranks never train in different stages.
        pending = self._plateau["wait"] >= nxt.patience
        self._plateau["pending"] = bool(trainer.strategy.reduce_boolean_decision(pending, all=False))

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        cache = None
        if self.cache is not None:
            cache = {"active": self.cache.active, "stats": self.cache.stats()}
        return {
            "stage": self.stage_index,
            "stage_name": self.stage_name() if self._plan else None,
            "boundaries": [dict(b) for b in self.boundaries],
            "plateau": dict(self._plateau),
            "cache": cache,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not self._fitting:
            return  # validate / test from a checkpoint: the stages of the run that made it stay as they are
        self.boundaries = [dict(b) for b in state_dict["boundaries"]]
        plateau = dict(state_dict["plateau"])
        index = int(state_dict["stage"])
        if self._plan and index >= len(self._plan):
            raise ValueError(f"the checkpoint is in stage {index}, but this plan has {len(self._plan)} stages")
        self.stage_index = index  # entered at on_fit_start
        self._restored_plateau = plateau

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Every stage's base LRs against WarmupDecay's floor (its schedule is resolved now), before the first step.
        for opt_index, warmup, group_index, group, first in self._staged_groups(trainer):
            if warmup is None or warmup.resolved is None:
                continue
            for i in range(len(self._plan)):
                if first in self._trainable[i]:
                    try:
                        warmup.check_base_lr(opt_index, group_index, self._stage_base_lr(group, first, i))
                    except ValueError as err:
                        raise ValueError(f"stage {i} ({self.stage_name(i)}): {err}") from err
        if self._restored_plateau is not None:
            self._plateau = self._restored_plateau  # on_fit_start's _enter reset it
            self._restored_plateau = None


class LinearProbeFinetune(StagedFinetuning):
    """Linear probe, then finetune (LP-FT, Kumar et al., ICLR 2022): train the head on frozen encoders first, so a
    good head, not a random one, sends gradients into the pretrained features; then unfreeze with lower LRs.

    Args:
        probe_epochs: epochs of the probe (encoders frozen).
        unfreeze: selectors of what trains in the finetune stage; default all managed modules.
        lr_multipliers: LR multipliers of the finetune stage (e.g. ``{"text": 0.1, "image": 0.3}``).
        warmup_steps: warmup of the unfrozen groups (needs :class:`~ml_optim_plugins.WarmupDecay`).
        train_bn: whether BatchNorm trains in the finetune stage.
        **kwargs: ``modules``, ``cache_features``, ``cache_dir``, ``verify_cache``, ``reset_early_stopping`` of
            :class:`~ml_optim_plugins.StagedFinetuning`.

    Example:
        >>> plan = LinearProbeFinetune(probe_epochs=2, unfreeze=["image", "text[-2:]"], lr_multipliers={"text": 0.1})
        >>> [(s.name, s.start_epoch, s.trainable) for s in plan.stages]
        [('probe', None, []), ('finetune', 2, ['image', 'text[-2:]'])]
    """

    def __init__(
        self,
        probe_epochs: int = 1,
        unfreeze: Sequence[str] | None = None,
        lr_multipliers: Mapping[str, float] | None = None,
        warmup_steps: int | None = None,
        train_bn: bool = True,
        **kwargs: Any,
    ) -> None:
        if probe_epochs < 1:
            raise ValueError(f"probe_epochs={probe_epochs}; expected >= 1 (use StagedFinetuning for no probe)")
        if unfreeze is not None and not list(unfreeze):
            raise ValueError(
                "LinearProbeFinetune(unfreeze=[]) unfreezes nothing, so the run never leaves the probe; leave unfreeze "
                "out to unfreeze every managed encoder, or name them (e.g. ['image', 'text[-2:]'])"
            )
        self.unfreeze = None if unfreeze is None else list(unfreeze)
        stages = [
            Stage(name="probe"),
            Stage(name="finetune", start_epoch=probe_epochs, trainable=list(self.unfreeze or []),
                  lr_multipliers=dict(lr_multipliers or {}), warmup_steps=warmup_steps, train_bn=train_bn),
        ]
        super().__init__(stages, **kwargs)

    def build_stages(self, pl_module: pl.LightningModule, modalities: Mapping[str, str]) -> list[Stage]:
        stages = list(self.stages)
        if self.unfreeze is None:
            stages[1].trainable = list(self.modules) if self.modules is not None else list(modalities)
        return stages


class GradualUnfreezing(StagedFinetuning):
    """Gradual unfreezing with discriminative LRs (ULMFiT, Howard & Ruder, ACL 2018): train the head on frozen
    encoders, then unfreeze one more block of each encoder, top (output side) first, every ``epochs_per_stage``
    epochs, each block ``factor`` times slower than the one above it.

    Blocks come from :func:`~ml_optim_plugins.encoder_blocks` (timm's stages / blocks, transformer layers). In stage
    ``k`` the top ``k`` blocks of every managed encoder train; the block ``d`` below the top gets LR multiplier
    ``factor ** -d`` (2.6 in the paper). Encoders with fewer blocks are fully unfrozen earlier.

    Args:
        epochs_per_stage: epochs between unfreezing steps (1 in the paper).
        factor: the discriminative factor between consecutive blocks.
        max_blocks: stop after unfreezing this many blocks of each encoder (default: all).
        warmup_steps: warmup of each newly unfrozen block (needs :class:`~ml_optim_plugins.WarmupDecay`).
        train_bn: whether BatchNorm of unfrozen blocks trains.
        **kwargs: ``modules`` (encoders to unfreeze: modality or module names, no block selection), and the cache
            arguments of :class:`~ml_optim_plugins.StagedFinetuning`.

    Example:
        >>> plan = GradualUnfreezing(epochs_per_stage=1, factor=2.6, max_blocks=3, warmup_steps=20)
        >>> [round(plan.factor ** -d, 3) for d in range(3)]  # LR multipliers of the top three blocks
        [1.0, 0.385, 0.148]
    """

    def __init__(
        self,
        epochs_per_stage: int = 1,
        factor: float = 2.6,
        max_blocks: int | None = None,
        warmup_steps: int | None = None,
        train_bn: bool = True,
        **kwargs: Any,
    ) -> None:
        if epochs_per_stage < 1:
            raise ValueError(f"epochs_per_stage={epochs_per_stage}; expected >= 1")
        factor = check_number("factor (lower blocks learn more slowly)", factor, at_least=1)
        if max_blocks is not None and max_blocks < 1:
            raise ValueError(f"max_blocks={max_blocks}; expected >= 1")
        super().__init__(None, **kwargs)
        self.epochs_per_stage, self.factor, self.max_blocks = epochs_per_stage, factor, max_blocks
        self.warmup_steps, self.train_bn = warmup_steps, train_bn

    def build_stages(self, pl_module: pl.LightningModule, modalities: Mapping[str, str]) -> list[Stage]:
        targets = list(self.modules) if self.modules is not None else list(modalities)
        modules = dict(pl_module.named_modules())
        depth: dict[str, int] = {}
        for target in targets:
            name, index = parse_selector(target)
            if index is not None:
                raise ValueError(f"GradualUnfreezing unfreezes whole encoders block by block; {target!r} selects "
                                 "blocks already. Name the encoder")
            module_name = modalities.get(name, name)
            if module_name not in modules:
                raise ValueError(f"GradualUnfreezing: {target!r} is neither a modality {sorted(modalities)} nor a "
                                 "module name")
            depth[target] = len(encoder_blocks(modules[module_name]))
        count = max(depth.values())
        if self.max_blocks is not None:
            count = min(count, self.max_blocks)
        stages = [Stage(name="probe")]
        for k in range(1, count + 1):
            trainable, multipliers = [], {}
            for target, blocks in depth.items():
                top = min(k, blocks)
                trainable.append(f"{target}[-{top}:]")
                for d in range(top):
                    multipliers[f"{target}[{-1 - d}]"] = self.factor ** -d
            stages.append(Stage(name=f"top{k}", start_epoch=k * self.epochs_per_stage, trainable=trainable,
                                lr_multipliers=multipliers, warmup_steps=self.warmup_steps, train_bn=self.train_bn))
        return stages
