"""Sending a callback's metrics straight to the Trainer's loggers, at the step Lightning logs with."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ml_optim_plugins.lightning_internals import logging_step


def log_to_loggers(trainer: Any, metrics: dict[str, float | Tensor]) -> None:
    """Send ``metrics`` straight to the Trainer's loggers at the current step, as ``LearningRateMonitor`` does.

    For values a callback produces every N steps: logged with ``LightningModule.log`` from a callback hook, Lightning
    would repeat the last value in every later row until the next one.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> from lightning.pytorch.loggers import Logger
        >>> class Printer(Logger):
        ...     name, version = "printer", 0
        ...     def log_metrics(self, metrics, step=None):
        ...         print(step, metrics)
        ...     def log_hyperparams(self, params):
        ...         pass
        >>> log_to_loggers(Trainer(logger=Printer(), enable_progress_bar=False), {"balance/image": Tensor([0.5])})
        0 {'balance/image': 0.5}
    """
    values = {key: float(value) for key, value in metrics.items()}
    step = logging_step(trainer)
    for logger in trainer.loggers:
        logger.log_metrics(values, step=step)
