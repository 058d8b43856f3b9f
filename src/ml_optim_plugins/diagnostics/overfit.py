"""OverfitBatchCheck: before training, make sure the model can drive the loss down on a few fixed batches."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch.optim import Optimizer

from ml_optim_plugins.hyperparameters import check_number, check_optional_number
from ml_optim_plugins.module_copy import detached_copy
from ml_optim_plugins.step_loss import fixed_randomness, training_step_loss


def _first_optimizer(configured: Any) -> Optimizer:
    """The first optimizer in whatever ``configure_optimizers`` returned (an optimizer, a list, a dict, a tuple)."""
    if isinstance(configured, Optimizer):
        return configured
    if isinstance(configured, dict):
        return _first_optimizer(configured["optimizer"])
    if isinstance(configured, (list, tuple)) and configured:
        return _first_optimizer(configured[0])
    raise TypeError(f"configure_optimizers returned {type(configured).__name__}; pass OverfitBatchCheck(optimizer=...)")


class OverfitBatchCheck(Callback):
    """Before training, train a copy of the model on ``num_batches`` fixed batches and check that the loss collapses.

    At ``on_train_start`` of a fresh run (skipped when resuming) it trains a deep copy, in its own RNG stream, for
    ``steps`` steps with the module's first optimizer (or ``optimizer``), and passes when the mean loss of the last 3
    steps is at most ``max_loss_ratio`` of the first step's; otherwise it raises (or warns) with a checklist. The real
    model, optimizer, data order and random state are untouched. The curve is logged as ``overfit_check/loss`` and
    drawn to ``overfit_check.png``; under DDP rank 0 runs it and every rank gets the verdict. docs/diagnostics.md
    says why and what the checklist covers.

    Args:
        steps: optimizer steps on the fixed batches.
        num_batches: how many batches, cycled.
        max_loss_ratio: pass if final loss / first loss is at most this.
        optimizer: ``params -> Optimizer`` to use instead of the module's own (e.g. when ``configure_optimizers``
            needs a Trainer).
        lr: override the learning rate of every param group.
        on_failure: ``"raise"`` (``RuntimeError``) or ``"warn"``.

    Example::

        trainer = Trainer(callbacks=[OverfitBatchCheck(steps=50, max_loss_ratio=0.2)])
    """

    def __init__(
        self,
        steps: int = 50,
        num_batches: int = 1,
        max_loss_ratio: float = 0.2,
        optimizer: OptimizerCallable | None = None,
        lr: float | None = None,
        on_failure: str = "raise",
        seed: int = 0,
    ) -> None:
        if steps < 4 or num_batches < 1:
            raise ValueError(f"need steps >= 4 and num_batches >= 1, got steps={steps}, num_batches={num_batches}")
        check_number("max_loss_ratio", max_loss_ratio, above=0, below=1)
        check_optional_number("lr", lr, at_least=0)  # 0 is not silent: the check then fails, with advice
        if on_failure not in ("raise", "warn"):
            raise ValueError(f"on_failure={on_failure!r}; expected 'raise' or 'warn'")
        self.steps, self.num_batches, self.max_loss_ratio = steps, num_batches, max_loss_ratio
        self.optimizer_factory, self.lr, self.on_failure, self.seed = optimizer, lr, on_failure, seed
        self.losses: list[float] = []
        self.passed: bool | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step > 0 or self.passed is not None:
            return  # resuming: the model was already checked (or is already training)
        if not pl_module.automatic_optimization:
            raise MisconfigurationException("OverfitBatchCheck trains the copy with automatic optimization only")
        log_dir = trainer.log_dir  # a collective under DDP: every rank asks
        outcome: dict[str, Any] | None = None
        if trainer.is_global_zero:
            outcome = self._run(trainer, pl_module, Path(log_dir or trainer.default_root_dir))
        outcome = trainer.strategy.broadcast(outcome, src=0)
        self.losses, self.passed = outcome["losses"], outcome["passed"]
        for logger in trainer.loggers:
            for step, loss in enumerate(self.losses):
                logger.log_metrics({"overfit_check/loss": loss, "overfit_check/step": step}, step=step)
        if not self.passed:
            if self.on_failure == "raise":
                raise RuntimeError(outcome["message"])
            rank_zero_warn(outcome["message"])
        else:
            rank_zero_info(outcome["message"])

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, log_dir: Path) -> dict[str, Any]:
        device = pl_module.device
        with fixed_randomness(self.seed, device):
            copy = detached_copy(pl_module)
            copy.train()
            batches = [
                trainer.strategy.batch_to_device(batch, device)
                for batch in itertools.islice(iter(trainer.train_dataloader), self.num_batches)
            ]
            if self.optimizer_factory is not None:
                optimizer = self.optimizer_factory(copy.parameters())
            else:
                optimizer = _first_optimizer(copy.configure_optimizers())
            if self.lr is not None:
                for group in optimizer.param_groups:
                    group["lr"] = self.lr
            losses = []
            for step in range(self.steps):
                optimizer.zero_grad(set_to_none=True)
                loss = training_step_loss(copy, batches[step % len(batches)])
                if not torch.isfinite(loss):
                    losses.append(float("nan"))
                    break
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
        final = sum(losses[-3:]) / len(losses[-3:])
        ratio = final / losses[0] if losses[0] > 0 else 0.0
        passed = bool(torch.isfinite(torch.tensor(final))) and ratio <= self.max_loss_ratio
        trainable = sum(p.numel() for p in copy.parameters() if p.requires_grad)
        total = sum(p.numel() for p in copy.parameters())
        what = f"{self.num_batches} fixed batch{'es' if self.num_batches > 1 else ''}"
        if passed:
            message = (f"OverfitBatchCheck passed: the loss on {what} fell from {losses[0]:.4g} to {final:.4g} "
                       f"({ratio:.1%} of its start) in {len(losses)} steps")
        else:
            message = (
                f"OverfitBatchCheck failed: in {len(losses)} steps on {what} the loss went from {losses[0]:.4g} to "
                f"{final:.4g} ({ratio:.1%} of its start; needed <= {self.max_loss_ratio:.0%}). A model that cannot "
                "overfit one batch has a bug or a bad setup. Check: the learning rate (try 10x larger and 10x "
                "smaller, e.g. OverfitBatchCheck(lr=...)), the initialisation and the loss (does it start near "
                "ln(num_classes) for a classifier?), that labels match inputs, that the model has capacity, and that "
                f"nothing is frozen by mistake ({trainable:,} of {total:,} parameters are trainable)"
            )
        self._plot(losses, log_dir / "overfit_check.png")
        return {"losses": losses, "passed": passed, "message": message}

    def _plot(self, losses: list[float], path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path.parent.mkdir(parents=True, exist_ok=True)
        fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
        ax.plot(losses, marker=".")
        ax.axhline(losses[0] * self.max_loss_ratio, color="grey", ls=":", label=f"{self.max_loss_ratio:.0%} of start")
        ax.set(xlabel="step on the fixed batches", ylabel="training loss", title="Overfit-one-batch check")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)

    def state_dict(self) -> dict[str, Any]:
        return {"losses": self.losses, "passed": self.passed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.losses, self.passed = state_dict["losses"], state_dict["passed"]
