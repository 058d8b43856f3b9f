"""Learning-rate warmup and decay: shapes as pure functions of the step, a torch scheduler and a callback.

The seam with other packages: :class:`LRDriver` (what a callback may ask of the one that sets the LRs),
:func:`lr_driver`, :func:`place_before_lr_drivers`, and the param-group naming and splitting that both sides share.
"""

from ml_optim_plugins.schedules.callback import WarmupDecay
from ml_optim_plugins.schedules.driver import LRDriver, lr_driver, place_before_lr_drivers
from ml_optim_plugins.schedules.param_groups import module_label, name_group, parameter_names, split_groups
from ml_optim_plugins.schedules.schedule import WarmupDecaySchedule
from ml_optim_plugins.schedules.scheduler import WarmupDecayLR, warmup_decay_scheduler
from ml_optim_plugins.schedules.shapes import COOLDOWN_SHAPES, DECAY_SHAPES, WARMUP_SHAPES, warmup_factor

__all__ = [
    "COOLDOWN_SHAPES",
    "DECAY_SHAPES",
    "LRDriver",
    "WARMUP_SHAPES",
    "WarmupDecay",
    "WarmupDecayLR",
    "WarmupDecaySchedule",
    "lr_driver",
    "module_label",
    "name_group",
    "parameter_names",
    "place_before_lr_drivers",
    "split_groups",
    "warmup_decay_scheduler",
    "warmup_factor",
]
