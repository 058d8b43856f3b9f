"""The quick-start model (timm CNN + packaged MiniLM, concat fusion), built the same way by every benchmark.

Importing this module also sets the offline environment: nothing is downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from ml_optim_plugins import (  # noqa: E402
    ConcatFusion,
    MultimodalClassifier,
    SentenceTransformerTextEncoder,
    TimmImageEncoder,
)


def quickstart_model(
    modalities: Sequence[str] = ("image", "text"), image_model: str = "resnet10t", max_length: int = 32,
    lr: float = 3e-4,
    aux_loss_weight: float = 0.0,
    optimizer: str = "adamw",
) -> MultimodalClassifier:
    """The quick-start recipe's model for ``modalities`` (a subset of image and text) with ``optimizer`` at ``lr``.

    ``optimizer``: ``"adamw"`` (weight decay 0.01, the recipes' choice) or ``"sgd"`` (momentum 0.9, weight decay 1e-4:
    the OGM-GE reference code's optimizer). Adam's per-parameter normalisation undoes most of a constant gradient
    scale, so gradient-modulation methods act differently under the two.
    """
    if optimizer not in ("adamw", "sgd"):
        raise ValueError(f"optimizer={optimizer!r}; expected 'adamw' or 'sgd'")
    encoders = {}
    if "image" in modalities:
        encoders["image"] = TimmImageEncoder(image_model)
    if "text" in modalities:
        encoders["text"] = SentenceTransformerTextEncoder("all-MiniLM-L6-v2", max_seq_length=max_length)
    return MultimodalClassifier(
        encoders,
        fusion=ConcatFusion(dropout=0.1),
        num_classes=3,
        optimizer=(
            (lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.01))
            if optimizer == "adamw"
            else (lambda params: torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4))
        ),
        aux_loss_weight=aux_loss_weight,
    )
