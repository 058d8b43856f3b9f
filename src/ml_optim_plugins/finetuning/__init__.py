"""Staged freeze-then-finetune of pretrained encoders: stages, the plan they resolve to, freezing helpers, built-in
plans, the callback that runs them, the frozen-feature cache and the frozen-lower-block activation cache."""

from ml_optim_plugins.finetuning.activation_cache import ActivationCache, activation_splits, split_point
from ml_optim_plugins.finetuning.blocks import encoder_blocks, parse_selector, select_parameters
from ml_optim_plugins.finetuning.cache import FeatureCache, module_fingerprint
from ml_optim_plugins.finetuning.callback import StagedFinetuning
from ml_optim_plugins.finetuning.freeze import (
    batchnorm_parameters,
    freeze,
    frozen_modules,
    keep_in_eval,
    make_trainable,
)
from ml_optim_plugins.finetuning.plan import FinetuningPlan, check_stages
from ml_optim_plugins.finetuning.plans import (
    GradualUnfreezing,
    LinearProbeFinetune,
    gradual_unfreezing_stages,
    linear_probe_stages,
)
from ml_optim_plugins.finetuning.stage import Stage

__all__ = [
    "ActivationCache",
    "FeatureCache",
    "FinetuningPlan",
    "GradualUnfreezing",
    "LinearProbeFinetune",
    "Stage",
    "StagedFinetuning",
    "batchnorm_parameters",
    "activation_splits",
    "check_stages",
    "encoder_blocks",
    "freeze",
    "frozen_modules",
    "gradual_unfreezing_stages",
    "keep_in_eval",
    "linear_probe_stages",
    "make_trainable",
    "module_fingerprint",
    "parse_selector",
    "select_parameters",
    "split_point",
]
