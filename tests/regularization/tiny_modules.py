"""A tiny regression LightningModule for the regularization tests (also run by the DDP script)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ml_optim_plugins.regularization import VariationalLinear


class Regression(pl.LightningModule):
    """``body`` (Linear or VariationalLinear) -> LayerNorm -> ReLU -> ``head``, MSE on 64 fixed samples, SGD."""

    def __init__(self, variational: bool = False, lr: float = 0.1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = VariationalLinear(8, 16) if variational else nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 1)
        self.lr = lr
        generator = torch.Generator().manual_seed(1)
        self.x = torch.randn(64, 8, generator=generator)
        self.y = self.x[:, :1] * 2 + torch.randn(64, 1, generator=generator) * 0.1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.norm(self.body(x))))

    def data_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (self(x) - y).pow(2).mean()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.data_loss(*batch)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=8)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)
