"""TrainingCurves: PNG plots of the loss and the learning rates in the run's log directory."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from ml_optim_plugins.hyperparameters import check_integer


def _scalar(value: Any) -> float | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value.detach())
    if isinstance(value, (int, float)):
        return float(value)
    return None


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """The means of every ``window`` consecutive ``values`` (``len(values) - window + 1`` of them)."""
    return torch.tensor(values).unfold(0, window, 1).mean(1).tolist()


def spans_decades(values: Iterable[float]) -> bool:
    """Whether the positive ``values`` span more than a decade, i.e. belong on a log scale."""
    positive = [v for v in values if v > 0]
    return bool(positive) and max(positive) / min(positive) > 10


def param_group_lrs(trainer: pl.Trainer, optimizer: Any) -> dict[str, float]:
    """The LR each param group of ``optimizer`` is about to be stepped with, whoever set it (a scheduler after the
    previous step, WarmupDecay now), keyed by group name (``pgN`` for unnamed groups; ``optK/`` in front when the
    Trainer has several optimizers). Call it in ``on_before_optimizer_step``."""
    raw = getattr(optimizer, "optimizer", optimizer)
    index = next((i for i, opt in enumerate(trainer.optimizers) if opt is raw), 0)
    lrs = {}
    for j, group in enumerate(raw.param_groups):
        name = group.get("name", f"pg{j + 1}")
        lrs[name if len(trainer.optimizers) == 1 else f"opt{index}/{name}"] = float(group["lr"])
    return lrs


class TrainingCurves(Callback):
    """Always plot your loss: draw the training and validation losses and every param group's LR over the steps.

    Records, with no logger needed: the training loss of every batch (what ``training_step`` returned, not the share
    of it that Lightning backpropagates under gradient accumulation), every validation metric with ``loss`` in its
    name at the end of each validation run, and the ``lr`` each param group of each optimizer is stepped with (read in
    ``on_before_optimizer_step``). At the end of each ``every_n_epochs``-th epoch and at the end of fit, rank 0 draws
    ``curves.png`` in the log directory: loss (raw and smoothed, log scale if it spans more than a decade) on top,
    learning rates below. The history is in ``state_dict``, so the plot of a resumed run covers the whole run.

    Args:
        filename: name of the PNG in the log directory.
        every_n_epochs: redraw every N epochs (0: only at the end of fit).
        smoothing: window (in steps) of the moving average drawn over the raw training loss.

    Example::

        trainer = Trainer(callbacks=[TrainingCurves()])   # -> <log_dir>/curves.png
    """

    def __init__(self, filename: str = "curves.png", every_n_epochs: int = 1, smoothing: int = 20) -> None:
        check_integer("every_n_epochs", every_n_epochs, at_least=0)
        check_integer("smoothing", smoothing, at_least=1)
        self.filename, self.every_n_epochs, self.smoothing = filename, every_n_epochs, smoothing
        self.train_loss: list[tuple[int, float]] = []
        self.val: dict[str, list[tuple[int, float]]] = defaultdict(list)
        self.lrs: dict[str, list[tuple[int, float]]] = defaultdict(list)
        self.path: Path | None = None

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = _scalar(outputs.get("loss") if isinstance(outputs, dict) else outputs)
        if loss is None:
            return
        if pl_module.automatic_optimization:
            # Lightning passes callbacks the loss it backpropagated, divided by accumulate_grad_batches (issue 17).
            loss *= trainer.accumulate_grad_batches
        self.train_loss.append((trainer.global_step, loss))

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        for name, lr in param_group_lrs(trainer, optimizer).items():
            self.lrs[name].append((trainer.global_step, lr))

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        for key, value in trainer.callback_metrics.items():
            number = _scalar(value)
            if number is not None and "loss" in key and not key.startswith(("train", "test")):
                self.val[key].append((trainer.global_step, number))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.draw(trainer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.draw(trainer)

    def draw(self, trainer: pl.Trainer) -> Path | None:
        """Draw the PNG now (rank 0); returns its path."""
        log_dir = trainer.log_dir  # a collective under DDP: every rank asks
        if not trainer.is_global_zero or not self.train_loss:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(log_dir or trainer.default_root_dir) / self.filename
        path.parent.mkdir(parents=True, exist_ok=True)
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), dpi=100, sharex=True)
        steps, losses = zip(*self.train_loss)
        top.plot(steps, losses, color="tab:blue", alpha=0.3, lw=0.8, label="train loss (per batch)")
        window = min(self.smoothing, len(losses))
        smooth = moving_average(losses, window)
        top.plot(steps[window - 1:], smooth, color="tab:blue", lw=1.6, label=f"train loss ({window}-step mean)")
        for key, points in self.val.items():
            x, y = zip(*points)
            top.plot(x, y, marker="o", lw=1.4, label=key)
        if spans_decades(losses):
            top.set_yscale("log")
        top.set(ylabel="loss", title="Training curves")
        top.legend(fontsize=8)
        for name, points in self.lrs.items():
            x, y = zip(*points)
            bottom.plot(x, y, lw=1.2, label=name)
        bottom.set(xlabel="optimizer step", ylabel="learning rate")
        if self.lrs:
            bottom.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        self.path = path
        return path

    def state_dict(self) -> dict[str, Any]:
        return {"train_loss": self.train_loss, "val": dict(self.val), "lrs": dict(self.lrs)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.train_loss = [tuple(p) for p in state_dict["train_loss"]]
        self.val = defaultdict(list, {k: [tuple(p) for p in v] for k, v in state_dict["val"].items()})
        self.lrs = defaultdict(list, {k: [tuple(p) for p in v] for k, v in state_dict["lrs"].items()})
