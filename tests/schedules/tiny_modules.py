"""Tiny LightningModules and recording callbacks for the schedule tests (also run by the DDP script)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.demos.boring_classes import RandomDataset
from torch import nn
from torch.utils.data import DataLoader

from ml_optim_plugins import warmup_decay_scheduler


class TwoLayer(pl.LightningModule):
    """``body`` and ``head`` in one SGD param group (or one group each); ``late`` is left out of the optimizer until a
    callback adds it. ``scheduler_args`` makes it return a warmup_decay_scheduler instead of a bare optimizer."""

    def __init__(
        self, lr: float = 0.1, per_layer_groups: bool = False, scheduler_args: dict[str, Any] | None = None
    ) -> None:
        super().__init__()
        self.body = nn.Linear(32, 16)
        self.head = nn.Linear(16, 2)
        self.late = nn.Linear(32, 2)
        self.lr, self.per_layer_groups, self.scheduler_args = lr, per_layer_groups, scheduler_args

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return (self.head(torch.relu(self.body(batch))) + self.late(batch)).pow(2).mean()

    def train_dataloader(self) -> DataLoader:
        return DataLoader(RandomDataset(32, 64), batch_size=2)

    def configure_optimizers(self) -> Any:
        if self.per_layer_groups:
            params = [{"params": self.body.parameters(), "name": "body"}, {"params": self.head.parameters(), "lr": 0.05}]
        else:
            params = [*self.body.parameters(), *self.head.parameters()]
        optimizer = torch.optim.SGD(params, lr=self.lr)
        if self.scheduler_args is None:
            return optimizer
        scheduler = warmup_decay_scheduler(optimizer, **self.scheduler_args)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class TwoOptimizers(TwoLayer):
    """Manual optimization: ``body`` (SGD) and ``head`` (Adam) stepped on alternate batches and both on every third."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def configure_optimizers(self) -> Any:
        return [torch.optim.SGD(self.body.parameters(), lr=0.1), torch.optim.Adam(self.head.parameters(), lr=0.01)]

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        body_opt, head_opt = self.optimizers()
        loss = self.head(torch.relu(self.body(batch))).pow(2).mean()
        self.manual_backward(loss)
        for opt, due in ((body_opt, batch_idx % 2 == 0 or batch_idx % 3 == 0), (head_opt, batch_idx % 2 == 1)):
            if due:
                opt.step()
            opt.zero_grad()


class LRRecorder(Callback):
    """Records, at every optimizer step (after WarmupDecay set them), each group's LR: ``lrs[i]`` for optimizer i."""

    def __init__(self) -> None:
        self.lrs: dict[int, list[list[float]]] = {}

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        raw = getattr(optimizer, "optimizer", optimizer)
        index = next(i for i, opt in enumerate(trainer.optimizers) if opt is raw)
        self.lrs.setdefault(index, []).append([group["lr"] for group in raw.param_groups])


class AddGroupAt(Callback):
    """Adds ``late`` to optimizer 0 as a new param group when ``global_step`` reaches ``step`` (like an unfreezing
    callback), and re-adds it when a run resumes after that point."""

    def __init__(self, step: int, lr: float = 0.05) -> None:
        self.step, self.lr, self.added = step, lr, False

    def _add(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.optimizers[0].add_param_group({"params": list(pl_module.late.parameters()), "lr": self.lr})
        self.added = True

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.added:
            self._add(trainer, pl_module)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if not self.added and trainer.global_step >= self.step:
            self._add(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"added": self.added}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.added = state_dict["added"]
