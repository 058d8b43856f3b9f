"""The pure part of staged finetuning: stages resolved against a model and checked, with each stage's trainable
parameters, LR multipliers and param-group labels. No Trainer needed.

:class:`~ml_optim_plugins.StagedFinetuning` builds a :class:`FinetuningPlan` at ``setup`` and applies it; the plan's
checks raise the errors (and word the warnings) that the callback reports.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from ml_optim_plugins.finetuning.blocks import select_parameters
from ml_optim_plugins.finetuning.freeze import batchnorm_parameters
from ml_optim_plugins.finetuning.stage import Stage, update_plateau
from ml_optim_plugins.schedules import module_label, parameter_names


def check_stages(stages: Sequence[Stage]) -> None:
    """Raise a ``ValueError`` for a plan that cannot run as written: no stage, a trigger on the first stage, a later
    stage without a trigger, triggers out of order, or two stages that start together (the first would never train).

    Example:
        >>> check_stages([Stage(), Stage(trainable=["image"])])
        Traceback (most recent call last):
        ...
        ValueError: stage 1 (unnamed) has no trigger: give start_epoch, start_step or monitor
    """
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


def managed_selectors(module: nn.Module, modules: Sequence[str] | None, modalities: Mapping[str, str]) -> list[str]:
    """The selectors of the modules a plan freezes and unfreezes: ``modules`` if given, else every modality.

    Raises:
        ValueError: neither ``modules`` nor a modality contract.

    Example:
        >>> managed_selectors(nn.Linear(2, 2), None, {"image": "encoders.image", "text": "encoders.text"})
        ['image', 'text']
    """
    if modules is not None:
        return list(modules)
    if modalities:
        return list(modalities)
    raise ValueError(
        f"StagedFinetuning: {type(module).__name__} has no modality contract (modality_encoders()); name the "
        "modules to freeze and unfreeze with modules=[...]"
    )


@dataclass(frozen=True)
class FinetuningPlan:
    """A staged-finetuning plan resolved against a model: per stage, the parameters that train and their LR multipliers.

    Parameters are identified by ``id()``. The *managed* parameters are frozen or trainable as each stage says; every
    other parameter (fusion, heads) trains in every stage, so it is in every stage's ``trainable`` set.

    Attributes:
        stages: the stages, checked with :func:`check_stages`.
        names: ``{id: qualified name}`` of every parameter.
        params: ``{id: parameter}`` of every parameter.
        modalities: ``{modality: encoder module name}`` the selectors resolved modality names with.
        managed: the managed parameters.
        trainable: per stage, the parameters that train (managed ones the stage names, and all unmanaged ones).
        multipliers: per stage, ``{id: LR multiplier}`` where a stage's ``lr_multipliers`` name a parameter.

    Example:
        >>> model = nn.ModuleDict({"enc": nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), "head": nn.Linear(2, 1)})
        >>> plan = FinetuningPlan.resolve(model, [Stage(), Stage(start_epoch=1, trainable=["enc[-1]"],
        ...                                                     lr_multipliers={"enc": 0.1})], ["enc"])
        >>> [sorted(plan.names[p] for p in plan.trainable[i]) for i in range(2)]
        [['head.bias', 'head.weight'], ['enc.1.bias', 'enc.1.weight', 'head.bias', 'head.weight']]
        >>> plan.base_lr(0.01, id(model["enc"][1].weight), 1), plan.base_lr(0.01, id(model["enc"][0].weight), 1)
        (0.001, 0.0)
    """

    stages: tuple[Stage, ...]
    names: Mapping[int, str]
    params: Mapping[int, nn.Parameter]
    modalities: Mapping[str, str]
    managed: frozenset[int]
    trainable: tuple[frozenset[int], ...]
    multipliers: tuple[Mapping[int, float], ...]

    @classmethod
    def resolve(
        cls,
        module: nn.Module,
        stages: Sequence[Stage],
        managed: Sequence[str],
        modalities: Mapping[str, str] | None = None,
    ) -> FinetuningPlan:
        """Check ``stages`` and resolve their selectors against ``module``.

        Args:
            module: the model (a LightningModule or any ``nn.Module``).
            stages: the stages, first first.
            managed: selectors of the modules that the stages freeze and unfreeze (:func:`managed_selectors`).
            modalities: ``{modality: module name}`` for modality selectors (``"image"``, ``"text[-2:]"``).

        Raises:
            ValueError: as :func:`check_stages`; a selector that matches nothing or a block out of range (see
                :func:`~ml_optim_plugins.finetuning.select_parameters`); a stage that makes trainable a module outside
                ``managed``.
        """
        stages = tuple(stages)
        check_stages(stages)
        modalities = dict(modalities or {})
        by_name = {name: id(p) for name, p in module.named_parameters()}

        def select(selector: str) -> set[int]:
            return {by_name[name] for name in select_parameters(module, selector, modalities) if name in by_name}

        names = parameter_names(module)
        params = {id(p): p for p in module.parameters()}
        managed_ids = frozenset().union(*(select(s) for s in managed))
        batchnorm = batchnorm_parameters(module)
        trainable: list[frozenset[int]] = []
        multipliers: list[dict[int, float]] = []
        for i, stage in enumerate(stages):
            chosen = set().union(*(select(s) for s in stage.trainable))
            outside = chosen - managed_ids
            if outside:
                example = sorted(names[p] for p in outside)[:3]
                raise ValueError(
                    f"stage {i} ({stage.name or f'stage{i}'}) makes trainable parameters that StagedFinetuning does "
                    f"not manage (e.g. {example}); they always train. Add their module to modules=[...] to stage them"
                )
            if not stage.train_bn:
                chosen -= batchnorm
            trainable.append(frozenset(chosen | (set(params) - managed_ids)))
            narrowest: dict[int, tuple[int, float]] = {}
            for selector, factor in stage.lr_multipliers.items():
                selected = select(selector)
                for pid in selected:  # the selector covering the fewest parameters wins
                    if pid not in narrowest or len(selected) < narrowest[pid][0]:
                        narrowest[pid] = (len(selected), factor)
            multipliers.append({pid: factor for pid, (_, factor) in narrowest.items()})
        return cls(stages, names, params, modalities, managed_ids, tuple(trainable), tuple(multipliers))

    # ------------------------------------------------------------------ stages and LRs
    def stage_name(self, index: int) -> str:
        """The name of stage ``index``: its ``name``, else ``"stage{index}"``."""
        return self.stages[index].name or f"stage{index}"

    def trajectory(self, pid: int) -> tuple[tuple[bool, float], ...]:
        """``(trainable, LR multiplier)`` of parameter ``pid`` in each stage: parameters alike share a param group."""
        return tuple((pid in self.trainable[i], self.multipliers[i].get(pid, 1.0)) for i in range(len(self.stages)))

    def base_lr(self, configured_lr: float, pid: int, stage: int) -> float:
        """The base LR in ``stage`` of a group whose parameters follow ``pid``'s plan: the LR it was configured with
        times the stage's multiplier, 0 while frozen."""
        if pid not in self.trainable[stage]:
            return 0.0
        return configured_lr * self.multipliers[stage].get(pid, 1.0)

    def group_labels(self, group: Mapping[str, Any]) -> list[str | None]:
        """One label per parameter of param group ``group``: equal for parameters with the same plan (all ``None`` if
        the group needs no split), for :func:`~ml_optim_plugins.schedules.split_groups`.

        A part is named after the stage in which it first trains (``"frozen"`` if never), plus its LR multiplier in
        that stage where two parts would read the same: ``encoders.text/frozen``, ``encoders.text/finetune``,
        ``encoders.text/stage1x0.5``. In a group that no module names (``pg1``: one group for the whole model), the
        part's module comes first: ``pg1/fusion.head/probe``, ``pg1/encoders/finetune``.
        """
        params = group["params"]
        plans = [self.trajectory(id(p)) for p in params]
        if len(set(plans)) <= 1:
            return [None] * len(params)
        prefix = f"{group['name']}." if "name" in group else None
        bases: dict[tuple, str] = {}
        first: dict[tuple, int | None] = {}
        for plan in dict.fromkeys(plans):
            first[plan] = next((i for i, (on, _) in enumerate(plan) if on), None)
            names = [self.names[id(p)] for p, other in zip(params, plans) if other == plan]
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

    @property
    def needs_lr_control(self) -> bool:
        """Whether a stage sets LR multipliers or a warmup (which a foreign LR scheduler would overwrite)."""
        return any(s.warmup_steps or s.lr_multipliers for s in self.stages[1:]) or bool(self.stages[0].lr_multipliers)

    def monitored_value(self, index: int, metrics: Mapping[str, Any]) -> float:
        """The value in ``metrics`` (``trainer.callback_metrics``) of the metric that stage ``index`` monitors.

        Raises:
            MisconfigurationException: the metric was not logged (naming the logged ones).
        """
        monitor = self.stages[index].monitor
        value = metrics.get(monitor)
        if value is None:
            raise MisconfigurationException(
                f"stage {index} ({self.stage_name(index)}) monitors {monitor!r}, which was not logged; logged metrics: "
                f"{sorted(metrics)}"
            )
        return float(value)

    def plateau_after_validation(
        self, index: int, plateau: Mapping[str, Any], metrics: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        """The plateau counters of stage ``index`` (the next one) after a validation run that logged ``metrics``, or
        ``None`` when there is no next stage or it has no plateau trigger. ``pending`` is this process's view: under
        DDP each rank has its own value unless the metric was logged with ``sync_dist``, so the callback all-reduces
        it (as ``EarlyStopping`` decides) and the ranks never train in different stages.

        Raises:
            MisconfigurationException: the monitored metric was not logged (:meth:`monitored_value`).
        """
        if index >= len(self.stages) or self.stages[index].monitor is None:
            return None
        return update_plateau(plateau, self.stages[index], self.monitored_value(index, metrics))

    def describe(self, index: int, epoch: int, step: int) -> str:
        """One line on entering stage ``index``: how many managed tensors train, which modules stay frozen."""
        trainable = self.trainable[index]
        frozen = sorted({self.names[p].rsplit(".", 1)[0] for p in self.managed - trainable})
        return (
            f"StagedFinetuning: stage {index} '{self.stage_name(index)}' from epoch {epoch}, step {step}: "
            f"{len(self.managed & trainable)} of {len(self.managed)} managed tensors trainable"
            + (f"; frozen modules include {frozen[:3]}" if frozen else "")
        )

    # ------------------------------------------------------------------ checks against the run
    def _examples(self, ids: Collection[int]) -> list[str]:
        return sorted(self.names[p] for p in ids)[:3]

    def check_lr_driver(
        self, optimizer_index: int, optimizer: str, *, driven: bool, foreign_scheduler: bool, fast_dev_run: bool
    ) -> None:
        """Raise a ``MisconfigurationException`` when the stages need LR control that optimizer ``optimizer_index``
        (of type ``optimizer``) lacks: multipliers or a warmup under a LR scheduler of ``configure_optimizers``, or a
        warmup without an LR driver (:class:`~ml_optim_plugins.WarmupDecay`)."""
        if foreign_scheduler and self.needs_lr_control:
            raise MisconfigurationException(
                f"StagedFinetuning: a stage sets LR multipliers or a warmup, but optimizer {optimizer_index} "
                f"({optimizer}) has a LR scheduler from configure_optimizers, which owns its LRs. "
                "Drive it with ml_optim_plugins.WarmupDecay instead, or drop lr_multipliers / warmup_steps"
            )
        if not driven and not fast_dev_run and any(s.warmup_steps for s in self.stages):
            raise MisconfigurationException(
                "StagedFinetuning: a stage asks for warmup_steps, which needs ml_optim_plugins.WarmupDecay in the "
                "Trainer's callbacks (it warms up each newly trainable group)"
            )

    def check_optimized(self, optimized: Collection[int]) -> None:
        """Raise a ``MisconfigurationException`` if a parameter that a later stage trains is not in ``optimized``
        (the ``id()`` s of the optimizers' parameters)."""
        never = {pid for trainable in self.trainable[1:] for pid in trainable} - set(optimized)
        if never:
            raise MisconfigurationException(
                f"StagedFinetuning: parameters that a later stage trains are in no optimizer (e.g. "
                f"{self._examples(never)}), so they would never train. configure_optimizers probably kept only "
                "parameters with requires_grad=True, which the frozen ones are not at that point; give the optimizer "
                "every parameter (frozen ones are skipped)"
            )

    def check_validation(self, has_validation: bool) -> None:
        """Raise a ``MisconfigurationException`` if a stage starts on a validation metric in a run without
        validation."""
        if any(s.monitor is not None for s in self.stages) and not has_validation:
            raise MisconfigurationException(
                "StagedFinetuning: a stage starts on a validation metric (monitor), but this run has no validation "
                "loop; add validation data or use start_epoch / start_step"
            )

    def check_refreeze(self, registered: Collection[int], find_unused_parameters: bool) -> None:
        """Raise a ``MisconfigurationException`` if a stage freezes a parameter that DDP synchronises (``registered``)
        while DDP does not look for unused parameters: DDP would wait for its gradient forever."""
        if find_unused_parameters:
            return
        for i in range(1, len(self.stages)):
            refrozen = set(registered) - self.trainable[i]
            if refrozen:
                raise MisconfigurationException(
                    f"stage {i} ({self.stage_name(i)}) freezes parameters that DDP already synchronises (e.g. "
                    f"{self._examples(refrozen)}); DDP then waits for their gradients forever. Use "
                    "DDPStrategy(find_unused_parameters=True), or keep them trainable"
                )

    def unreached_stage(self, max_epochs: int | None, max_steps: int, after: int = 0) -> str | None:
        """A warning about the first stage after stage ``after`` that a run of ``max_epochs`` / ``max_steps`` (``-1``
        or ``None``: no limit) ends before, or ``None``: a shortened trial run silently never trains the encoders.

        Example:
            >>> plan = FinetuningPlan((Stage(), Stage(start_epoch=2)), {}, {}, {}, frozenset(),
            ...                       (frozenset(), frozenset()), ({}, {}))
            >>> plan.unreached_stage(max_epochs=2, max_steps=-1)[:58]
            'StagedFinetuning: stage 1 (stage1) starts at epoch 2, but '
        """
        limits = {"epoch": max_epochs if (max_epochs or -1) >= 0 else None,
                  "step": max_steps if max_steps >= 0 else None}
        for i in range(max(1, after + 1), len(self.stages)):
            stage = self.stages[i]
            starts = {unit: getattr(stage, f"start_{unit}") for unit in limits}
            late = {unit: start for unit, start in starts.items()
                    if start is not None and limits[unit] is not None and start >= limits[unit]}
            if not late or stage.monitor is not None or len(late) < sum(v is not None for v in starts.values()):
                continue
            unit, start = next(iter(late.items()))
            newly = sorted({self.names[p].rsplit(".", 1)[0] for p in self.trainable[i] - self.trainable[i - 1]})
            return (
                f"StagedFinetuning: stage {i} ({self.stage_name(i)}) starts at {unit} {start}, but max_{unit}s="
                f"{limits[unit]} ends the run first, so it never runs"
                + (f" and {newly[:3]} never train" if newly else "")
                + f". Raise max_{unit}s above {start}, or start the stage earlier (LinearProbeFinetune: probe_epochs; "
                "GradualUnfreezing: epochs_per_stage)"
            )
        return None

    def random_frozen_encoders(self, module: nn.Module) -> list[str]:
        """Warnings about encoders that the first stage freezes although they say they have no pretrained weights
        (``pretrained_weights = False``, as :class:`~ml_optim_plugins.TimmImageEncoder` without weights)."""
        modules = dict(module.named_modules())
        warnings = []
        for modality, name in self.modalities.items():
            encoder = modules[name]
            frozen = {id(p) for p in encoder.parameters()} & (self.managed - self.trainable[0])
            if frozen and getattr(encoder, "pretrained_weights", None) is False:
                warnings.append(
                    f"StagedFinetuning freezes the {modality!r} encoder ({type(encoder).__name__}), which has random "
                    "weights: kept in eval() it gives the head fixed random features until it is unfrozen. Staging is "
                    "meant for pretrained encoders: load weights (pretrained='packaged', checkpoint_path=...), or "
                    "leave this encoder out of modules=[...] so that it always trains"
                )
        return warnings
