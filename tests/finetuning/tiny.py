"""A small two-encoder classifier for staged-finetuning tests: an "image" CNN with BatchNorm and dropout, and a
"text" stack of layers in an nn.ModuleList (block structure like a transformer), on data with sample ids."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader

from ml_optim_plugins import ConcatFusion, MultimodalClassifier


class TinyCNN(nn.Module):
    output_dim = 6

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.block(self.stem(x)))


class TinyLayers(nn.Module):
    output_dim = 8

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(5, 8)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Dropout(0.2)) for _ in range(3))
        self.norm = nn.LayerNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for layer in self.layers:
            h = h + layer(h)
        return self.norm(h)


class SplitTinyLayers(TinyLayers):
    """The tests' layer-stack encoder, opted in to the activation cache by implementing SplittableEncoder."""

    def split_blocks(self):
        return [self.embed, *self.layers, self.norm]

    def forward_lower(self, x, block):
        for module in self.split_blocks()[:block]:
            x = module(x) if module is self.embed or module is self.norm else x + module(x)
        return x

    def forward_upper(self, h, block):
        for module in self.split_blocks()[block:]:
            h = module(h) if module is self.embed or module is self.norm else h + module(h)
        return h


def tiny_staged_model(seed: int = 0, lr: float = 0.05, split_text: bool = False, **kwargs) -> MultimodalClassifier:
    """The two-encoder classifier; ``split_text``: its text encoder opts in to the activation cache (same weights)."""
    torch.manual_seed(seed)
    return MultimodalClassifier(
        {"image": TinyCNN(), "text": SplitTinyLayers() if split_text else TinyLayers()}, fusion=ConcatFusion(),
        num_classes=3,
        optimizer=lambda groups: torch.optim.AdamW(groups, lr=lr), **kwargs,
    )


def samples(n: int = 48, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=g)
    images = torch.rand(n, 3, 6, 6, generator=g)
    images[torch.arange(n), labels % 3] += 0.5
    texts = torch.randn(n, 5, generator=g)
    texts[torch.arange(n), labels] += 1.5
    return [{"image": images[i], "text": texts[i], "label": labels[i], "index": i} for i in range(n)]


def loader(batch_size: int = 8, n: int = 48, shuffle: bool = False) -> DataLoader:
    return DataLoader(samples(n), batch_size=batch_size, shuffle=shuffle)


def trainer(tmp_path=None, **kwargs):
    import lightning.pytorch as pl

    options = dict(
        accelerator="cpu", devices=1, max_epochs=3, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, deterministic=True,
    )
    if tmp_path is not None:
        options["default_root_dir"] = str(tmp_path)
    options.update(kwargs)
    return pl.Trainer(**options)
