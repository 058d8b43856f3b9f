"""A two-modality classifier with linear encoders and data where modality "a" is far more informative than "b"."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from ml_optim_plugins import ConcatFusion, MultimodalClassifier


def tiny_classifier(seed: int = 0, **kwargs) -> MultimodalClassifier:
    torch.manual_seed(seed)
    return MultimodalClassifier(
        {"a": torch.nn.Linear(4, 8), "b": torch.nn.Linear(6, 8)}, fusion=kwargs.pop("fusion", ConcatFusion()),
        num_classes=3, feature_dims={"a": 8, "b": 8}, optimizer=lambda params: torch.optim.SGD(params, lr=0.5), **kwargs,
    )


def imbalanced_samples(n: int = 64, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=g)
    a = torch.randn(n, 4, generator=g) * 0.1
    a[torch.arange(n), labels] += 3.0  # strong cue
    b = torch.randn(n, 6, generator=g)
    b[torch.arange(n), labels] += 0.3  # weak cue
    return [{"a": a[i], "b": b[i], "label": labels[i]} for i in range(n)]


def loader(batch_size: int = 16, n: int = 64) -> DataLoader:
    return DataLoader(imbalanced_samples(n), batch_size=batch_size)
