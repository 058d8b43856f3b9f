"""Sending a callback's metrics straight to the Trainer's loggers, at the step Lightning logs with."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ml_optim_plugins.lightning_internals import logging_step


def log_to_loggers(trainer: Any, metrics: dict[str, float | Tensor]) -> None:
    """Send ``metrics`` straight to the Trainer's loggers at the current step, as ``LearningRateMonitor`` does.

    For values a callback produces every N steps: logged with ``LightningModule.log`` from a callback hook, Lightning
    would repeat the last value in every later row until the next one.
    """
    values = {key: float(value) for key, value in metrics.items()}
    step = logging_step(trainer)
    for logger in trainer.loggers:
        logger.log_metrics(values, step=step)
