"""GradientCheck: run check_gradients on a real training batch from inside a Trainer."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from ml_optim_plugins.gradcheck.core import check_gradients
from ml_optim_plugins.gradcheck.report import GradCheckReport
from ml_optim_plugins.hyperparameters import check_integer
from ml_optim_plugins.logger_metrics import log_to_loggers
from ml_optim_plugins.metric_names import GRADCHECK_FAILED_TENSORS, GRADCHECK_PASSED, gradcheck_error_key
from ml_optim_plugins.step_loss import require_loss_fn_under_manual_optimization

ON_FAILURE = ("raise", "warn")


class GradientCheck(Callback):
    """Check the model's gradients numerically on the first training batch (and every N epochs, if asked).

    At ``on_train_batch_start`` of the first batch, :func:`~ml_optim_plugins.check_gradients` runs on a float64 copy of
    the module with the real batch: the run's own weights, optimizer and RNG are not touched, so training continues
    exactly as without the callback. Under DDP only rank 0 checks, and its verdict is broadcast so every rank stops
    (or goes on) together. The report is printed, saved as ``gradcheck-epoch{E}.json`` in the log directory, and
    summarised in the logged metrics ``gradcheck/passed``, ``gradcheck/failed_tensors`` and
    ``gradcheck/max_rel_error/{modality}``.

    Args:
        every_n_epochs: also check at the first batch of every N-th epoch; ``None``: only once, at the start.
        on_failure: ``"raise"`` (stop with a ``RuntimeError`` naming the worst modules) or ``"warn"``.
        max_samples: check on the first samples of the batch only: the same code paths, at a fraction of the cost
            (the check costs ~2 loss evaluations per tensor; on the quick-start model 2 samples take 22 training
            steps' time, 8 samples 55).
        directions: random directions per large tensor.
        params: names or globs of the parameters to check; default all trainable ones.
        **check_args: further arguments of :func:`~ml_optim_plugins.check_gradients` (``eps``, ``rtol``, ``atol``,
            ``max_exact_elements``, ``mode``, ``inputs``, ``seed``, ``worst``, ``loss_fn``); a module with manual
            optimization needs ``loss_fn(module, batch) -> scalar``.

    Raises:
        ValueError: an unknown ``on_failure`` or check argument (at construction).
        MisconfigurationException: at fit start, a manual-optimization module without ``loss_fn``.
        RuntimeError: when ``on_failure="raise"`` and a gradient is wrong.

    Example::

        trainer = Trainer(callbacks=[GradientCheck(on_failure="raise")])
    """

    def __init__(
        self,
        every_n_epochs: int | None = None,
        on_failure: str = "raise",
        max_samples: int | None = 2,
        directions: int = 1,
        params: Sequence[str] | None = None,
        **check_args: Any,
    ) -> None:
        if on_failure not in ON_FAILURE:
            raise ValueError(f"on_failure={on_failure!r}; expected one of {', '.join(ON_FAILURE)}")
        if every_n_epochs is not None:
            check_integer("every_n_epochs", every_n_epochs, at_least=1)
        allowed = {"eps", "rtol", "atol", "max_exact_elements", "mode", "inputs", "seed", "worst", "loss_fn"}
        unknown = sorted(set(check_args) - allowed)
        if unknown:
            raise ValueError(f"unknown check argument(s) {unknown}; expected some of {sorted(allowed)}")
        self.every_n_epochs, self.on_failure = every_n_epochs, on_failure
        self.check_args = dict(check_args, max_samples=max_samples, directions=directions, params=params)
        self.checked_epochs: list[int] = []
        self.last_report: GradCheckReport | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        require_loss_fn_under_manual_optimization(pl_module, self.check_args.get("loss_fn"), "GradientCheck")

    def _due(self, epoch: int) -> bool:
        if epoch in self.checked_epochs:
            return False
        if self.every_n_epochs is None:
            return not self.checked_epochs
        return epoch % self.every_n_epochs == 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        epoch = trainer.current_epoch
        if batch_idx != 0 or not self._due(epoch):
            return
        log_dir = trainer.log_dir  # a collective under DDP: every rank asks
        summary: dict[str, Any] | None = None
        if trainer.is_global_zero:
            report = check_gradients(pl_module, batch, **self.check_args)
            self.last_report = report
            path = Path(log_dir or trainer.default_root_dir) / f"gradcheck-epoch{epoch}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(report.to_dict(), indent=1))
            rank_zero_info(f"{report}\n(saved to {path})")
            summary = {
                "passed": report.passed,
                "failed": len(report.failed),
                "by_modality": {name: g["max_rel_error"] for name, g in report.by_modality().items()},
                "message": self._message(report, epoch, path),
            }
        summary = trainer.strategy.broadcast(summary, src=0)
        self.checked_epochs.append(epoch)
        metrics = {GRADCHECK_PASSED: float(summary["passed"]), GRADCHECK_FAILED_TENSORS: summary["failed"]}
        metrics.update({gradcheck_error_key(name): v for name, v in summary["by_modality"].items()})
        log_to_loggers(trainer, metrics)
        if not summary["passed"]:
            if self.on_failure == "raise":
                raise RuntimeError(summary["message"])
            rank_zero_warn(summary["message"])

    @staticmethod
    def _message(report: GradCheckReport, epoch: int, path: Path) -> str:
        worst = [f"{t.name} (rel. error {t.max_rel_error:.2g})" for t in report.failed[:5]]
        return (
            f"gradient check failed at epoch {epoch}: {len(report.failed)} of {len(report.tensors)} tensors have "
            f"wrong gradients; worst modules: {', '.join(report.worst_modules())}; worst tensors: {', '.join(worst)}. "
            "A wrong backward of a layer also shows in the parameters before it (its input gradient flows there); "
            f"the full report is in {path}"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"checked_epochs": list(self.checked_epochs)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.checked_epochs = list(state_dict["checked_epochs"])
