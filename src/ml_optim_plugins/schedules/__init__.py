"""Learning-rate warmup and decay: shapes as pure functions of the step, a torch scheduler and a callback."""

from ml_optim_plugins.schedules.callback import WarmupDecay
from ml_optim_plugins.schedules.schedule import WarmupDecaySchedule
from ml_optim_plugins.schedules.scheduler import WarmupDecayLR, warmup_decay_scheduler
from ml_optim_plugins.schedules.shapes import COOLDOWN_SHAPES, DECAY_SHAPES, WARMUP_SHAPES, warmup_factor

__all__ = [
    "COOLDOWN_SHAPES",
    "DECAY_SHAPES",
    "WARMUP_SHAPES",
    "WarmupDecay",
    "WarmupDecayLR",
    "WarmupDecaySchedule",
    "warmup_decay_scheduler",
    "warmup_factor",
]
