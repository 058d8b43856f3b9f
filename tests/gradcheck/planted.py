"""Models for the gradient-check tests: a custom autograd.Function with a correct or a planted-bug backward inside an
otherwise ordinary network, and correct models with dropout, BatchNorm, LayerNorm, embeddings and attention."""

from __future__ import annotations

import torch
from torch import nn

BUGS = ("none", "scaled", "sign", "missing_term", "one_element")


class ScaledSine(torch.autograd.Function):
    """y = x * w + sin(x) with w a per-feature parameter; the backward can carry a planted bug."""

    @staticmethod
    def forward(ctx, x, w, bug):
        ctx.save_for_backward(x, w)
        ctx.bug = bug
        return x * w + torch.sin(x)

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        grad_x = grad * (w + torch.cos(x))
        grad_w = (grad * x).sum(0)
        if ctx.bug == "scaled":
            grad_x = 2 * grad_x
        elif ctx.bug == "sign":
            grad_w = -grad_w
        elif ctx.bug == "missing_term":
            grad_x = grad * w
        elif ctx.bug == "one_element":
            grad_w = grad_w.clone()
            grad_w[3] = grad_w[3] * 1.5
        return grad_x, grad_w, None


class ScaledSineLayer(nn.Module):
    def __init__(self, features: int, bug: str = "none") -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(features) * 0.5 + 1)
        self.bug = bug

    def forward(self, x):
        return ScaledSine.apply(x, self.w, self.bug)


class WithCustomLayer(nn.Module):
    """Linear -> ScaledSine (custom backward) -> tanh -> Linear, cross-entropy."""

    def __init__(self, bug: str = "none") -> None:
        super().__init__()
        self.encoder = nn.Linear(6, 8)
        self.custom = ScaledSineLayer(8, bug)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.custom(self.encoder(x))))


def classification_loss(module: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(module(x), y)


class Everything(nn.Module):
    """Embeddings, a transformer encoder layer (attention, LayerNorm, dropout), a conv branch with BatchNorm, ReLU and
    max pooling, fused by concatenation."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(50, 16)
        self.attention = nn.TransformerEncoderLayer(16, nhead=2, dim_feedforward=32, dropout=0.2, batch_first=True)
        self.conv = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2))
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(16 + 4 * 4 * 4, 3)

    def forward(self, batch):
        text = self.attention(self.embedding(batch["tokens"])).mean(1)
        image = self.conv(batch["image"]).flatten(1)
        return self.head(self.dropout(torch.cat([text, image], 1)))


def everything_loss(module: nn.Module, batch) -> torch.Tensor:
    return nn.functional.cross_entropy(module(batch), batch["label"])


def everything_batch(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "tokens": torch.randint(0, 50, (6, 5), generator=g),
        "image": torch.randn(6, 3, 8, 8, generator=g),
        "label": torch.randint(0, 3, (6,), generator=g),
    }


class CustomLightning(__import__("lightning").pytorch.LightningModule):
    """WithCustomLayer as a LightningModule on 64 fixed samples (batch 8), SGD."""

    def __init__(self, bug: str = "none", lr: float = 0.1, shuffle: bool = True) -> None:
        super().__init__()
        self.shuffle = shuffle
        torch.manual_seed(0)
        self.net = WithCustomLayer(bug)
        self.lr = lr
        g = torch.Generator().manual_seed(5)
        self.x, self.y = torch.randn(64, 6, generator=g), torch.randint(0, 3, (64,), generator=g)

    def training_step(self, batch, batch_idx):
        loss = classification_loss(self.net, batch)
        self.log("train/loss", loss)
        return loss

    def train_dataloader(self):
        data = torch.utils.data.TensorDataset(self.x, self.y)
        return torch.utils.data.DataLoader(data, batch_size=8, shuffle=self.shuffle)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)
