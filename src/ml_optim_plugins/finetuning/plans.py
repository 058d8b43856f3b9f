"""The built-in plans: linear probe then finetune (LP-FT) and gradual unfreezing (ULMFiT), each a function that
returns the stages and a :class:`~ml_optim_plugins.StagedFinetuning` that runs them."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
from torch import nn

from ml_optim_plugins.finetuning.blocks import encoder_blocks, parse_selector
from ml_optim_plugins.finetuning.callback import StagedFinetuning
from ml_optim_plugins.finetuning.stage import Stage
from ml_optim_plugins.hyperparameters import check_number


def linear_probe_stages(
    probe_epochs: int,
    unfreeze: Sequence[str],
    lr_multipliers: Mapping[str, float] | None = None,
    warmup_steps: int | None = None,
    train_bn: bool = True,
) -> list[Stage]:
    """The stages of LP-FT: ``probe`` (managed modules frozen), then ``finetune`` from epoch ``probe_epochs``.

    Example:
        >>> [(s.name, s.start_epoch, s.trainable) for s in linear_probe_stages(2, ["image", "text[-2:]"])]
        [('probe', None, []), ('finetune', 2, ['image', 'text[-2:]'])]
    """
    return [
        Stage(name="probe"),
        Stage(name="finetune", start_epoch=probe_epochs, trainable=list(unfreeze),
              lr_multipliers=dict(lr_multipliers or {}), warmup_steps=warmup_steps, train_bn=train_bn),
    ]


def gradual_unfreezing_stages(
    module: nn.Module,
    encoders: Sequence[str],
    modalities: Mapping[str, str],
    epochs_per_stage: int = 1,
    factor: float = 2.6,
    max_blocks: int | None = None,
    warmup_steps: int | None = None,
    train_bn: bool = True,
) -> list[Stage]:
    """The stages of gradual unfreezing: ``probe``, then ``top1``, ``top2``, ...: in stage ``k`` the top ``k`` blocks
    (:func:`~ml_optim_plugins.finetuning.encoder_blocks`) of each of ``encoders`` train, block ``d`` below the top at LR
    multiplier ``factor ** -d``.

    Args:
        module: the model.
        encoders: modality or module names of the encoders to unfreeze (no block selection).
        modalities: ``{modality: module name}`` of the model's modality contract.
        epochs_per_stage, factor, max_blocks, warmup_steps, train_bn: as :class:`GradualUnfreezing`.

    Raises:
        ValueError: a selector with a block selection, or one that is neither a modality nor a module name.

    Example:
        >>> model = nn.ModuleDict({"enc": nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), "head": nn.Linear(2, 1)})
        >>> stages = gradual_unfreezing_stages(model, ["enc"], {}, factor=2.0)
        >>> [(s.name, s.trainable) for s in stages], stages[2].lr_multipliers
        ([('probe', []), ('top1', ['enc[-1:]']), ('top2', ['enc[-2:]'])], {'enc[-1]': 1.0, 'enc[-2]': 0.5})
    """
    modules = dict(module.named_modules())
    depth: dict[str, int] = {}
    for target in encoders:
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
    if max_blocks is not None:
        count = min(count, max_blocks)
    stages = [Stage(name="probe")]
    for k in range(1, count + 1):
        trainable, multipliers = [], {}
        for target, blocks in depth.items():
            top = min(k, blocks)
            trainable.append(f"{target}[-{top}:]")
            for d in range(top):
                multipliers[f"{target}[{-1 - d}]"] = factor ** -d
        stages.append(Stage(name=f"top{k}", start_epoch=k * epochs_per_stage, trainable=trainable,
                            lr_multipliers=multipliers, warmup_steps=warmup_steps, train_bn=train_bn))
    return stages


class LinearProbeFinetune(StagedFinetuning):
    """Linear probe, then finetune (LP-FT, Kumar et al., ICLR 2022): train the head on frozen encoders first, so a
    good head, not a random one, sends gradients into the pretrained features; then unfreeze with lower LRs.

    Args:
        probe_epochs: epochs of the probe (encoders frozen).
        unfreeze: selectors of what trains in the finetune stage; default all managed modules.
        lr_multipliers: LR multipliers of the finetune stage (e.g. ``{"text": 0.1, "image": 0.3}``).
        warmup_steps: warmup of the unfrozen groups (needs :class:`~ml_optim_plugins.WarmupDecay`).
        train_bn: whether BatchNorm trains in the finetune stage.
        **kwargs: ``modules``, ``cache_features``, ``cache_activations``, ``cache_dir``, ``verify_cache``,
            ``reset_early_stopping`` of :class:`~ml_optim_plugins.StagedFinetuning`.

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
        stages = linear_probe_stages(probe_epochs, self.unfreeze or [], lr_multipliers, warmup_steps, train_bn)
        super().__init__(stages, **kwargs)

    def build_stages(self, pl_module: pl.LightningModule, modalities: Mapping[str, str]) -> list[Stage]:
        probe, finetune = self.stages
        if self.unfreeze is None:
            finetune = dataclasses.replace(finetune, trainable=self.managed_modules(pl_module, modalities))
        return [probe, finetune]


class GradualUnfreezing(StagedFinetuning):
    """Gradual unfreezing with discriminative LRs (ULMFiT, Howard & Ruder, ACL 2018): train the head on frozen
    encoders, then unfreeze one more block of each encoder, top (output side) first, every ``epochs_per_stage``
    epochs, each block ``factor`` times slower than the one above it.

    The stages are :func:`gradual_unfreezing_stages` of the managed encoders: in stage ``k`` the top ``k`` blocks
    train, block ``d`` below the top at LR multiplier ``factor ** -d`` (2.6 in the paper). Encoders with fewer blocks
    are fully unfrozen earlier.

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
        return gradual_unfreezing_stages(
            pl_module, self.managed_modules(pl_module, modalities), modalities, self.epochs_per_stage, self.factor,
            self.max_blocks, self.warmup_steps, self.train_bn,
        )
