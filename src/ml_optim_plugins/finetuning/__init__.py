"""Staged freeze-then-finetune of pretrained encoders: stages, plans, frozen-feature cache."""

from ml_optim_plugins.finetuning.blocks import encoder_blocks, parse_selector, select_parameters
from ml_optim_plugins.finetuning.cache import FeatureCache, module_fingerprint
from ml_optim_plugins.finetuning.callback import GradualUnfreezing, LinearProbeFinetune, StagedFinetuning
from ml_optim_plugins.finetuning.stage import Stage

__all__ = [
    "FeatureCache",
    "GradualUnfreezing",
    "LinearProbeFinetune",
    "Stage",
    "StagedFinetuning",
    "encoder_blocks",
    "module_fingerprint",
    "parse_selector",
    "select_parameters",
]
