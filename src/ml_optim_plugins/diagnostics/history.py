"""MetricHistory: a Lightning logger that keeps every scalar it receives in memory."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

Series = list[tuple[int, float]]


class MetricHistory(Logger):
    """A Lightning logger that keeps every scalar it receives in memory (rank 0): what the CSV logger writes, including
    values that callbacks send straight to the loggers (balancing coefficients, LR monitors, gradient checks).

    :class:`RunReport` adds one to the Trainer's loggers; it can also be used on its own.

    Example:
        >>> history = MetricHistory()
        >>> history.log_metrics({"train/loss": 0.5}, step=3)
        >>> history.series("train/loss")
        [(3, 0.5)]
    """

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict[str, float]]] = []
        self.nonfinite: dict[str, int] = {}  # metric -> how many NaN / Inf values it received (not kept in rows)
        self.recording = True  # RunReport keeps the history of fit only

    @property
    def name(self) -> str:
        return "history"

    @property
    def version(self) -> int:
        return 0

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        if not self.recording:
            return
        values = {}
        for key, value in metrics.items():
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    continue
                value = value.item()
            if isinstance(value, (int, float)):
                if math.isfinite(float(value)):
                    values[key] = float(value)
                else:
                    self.nonfinite[key] = self.nonfinite.get(key, 0) + 1
        if values:
            self.rows.append((int(step or 0), values))

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        """Hyperparameters are not kept (the run directory has the config)."""

    def keys(self) -> set[str]:
        """Every metric name logged so far."""
        return {key for _, values in self.rows for key in values}

    def series(self, key: str) -> Series:
        """``[(step, value), ...]`` of one metric, in logging order."""
        return [(step, values[key]) for step, values in self.rows if key in values]
