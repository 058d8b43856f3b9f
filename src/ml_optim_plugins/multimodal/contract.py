"""The modality contract shared by every modality-aware callback.

A module is *modality-aware* when it says which sub-module encodes each modality and, after each training step, what
each modality alone predicts. Balancing, per-modality gradient health and staged finetuning read only this contract,
so they work on a user's own LightningModule as well as on :class:`~ml_optim_plugins.MultimodalClassifier`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch  # noqa: F401 (the examples use it)
from torch import Tensor, nn


MODALITY_SCORINGS = ("auto", "head_split", "masking", "aux_heads")


@runtime_checkable
class ModalityAware(Protocol):
    """Protocol of a module whose modalities callbacks can inspect.

    Implement it directly, or inherit :class:`ModalityAwareMixin`, which implements it on top of an ``encoders``
    ``nn.ModuleDict`` and a :class:`~ml_optim_plugins.Fusion`.

    Attributes:
        modality_logits: per-modality predictions of the last training step, ``{name: (batch, classes)}``, detached.
            Empty before the first step.
        modality_targets: the targets of that same step, shape ``(batch,)``; ``None`` before the first step.

    Example:
        >>> from ml_optim_plugins import ModalityAware
        >>> class Mine(torch.nn.Module):
        ...     modality_logits, modality_targets = {}, None
        ...     def modality_encoders(self):
        ...         return {"image": torch.nn.Identity()}
        >>> isinstance(Mine(), ModalityAware)
        True
    """

    modality_logits: Mapping[str, Tensor]
    modality_targets: Tensor | None

    def modality_encoders(self) -> Mapping[str, nn.Module]:
        """Return the encoder of each modality; parameters outside them are shared (fusion, head)."""
        ...


def parameter_modalities(module: Any) -> dict[int, str]:
    """``{id(parameter): modality}`` for the parameters of each modality's encoder; empty for a module without the
    contract. Parameters outside the encoders (fusion, head) are absent: they are shared.

    Example:
        >>> class Two(torch.nn.Module):
        ...     modality_logits, modality_targets = {}, None
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.a, self.head = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)
        ...     def modality_encoders(self):
        ...         return {"a": self.a}
        >>> model = Two()
        >>> sorted(parameter_modalities(model).values()), id(model.head.weight) in parameter_modalities(model)
        (['a', 'a'], False)
    """
    encoders = getattr(module, "modality_encoders", None)
    if not callable(encoders):
        return {}
    return {id(p): name for name, encoder in encoders().items() for p in encoder.parameters()}


def modality_module_names(module: Any) -> dict[str, str]:
    """``{modality: qualified name of its encoder in module}`` (``""`` for the module itself); empty for a module
    without the contract. Encoders that are not sub-modules of ``module`` are left out.

    Example:
        >>> class Two(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.towers = torch.nn.ModuleDict({"a": torch.nn.Linear(2, 2)})
        ...     def modality_encoders(self):
        ...         return {"a": self.towers["a"]}
        >>> modality_module_names(Two()), modality_module_names(torch.nn.Linear(2, 2))
        ({'a': 'towers.a'}, {})
    """
    encoders = getattr(module, "modality_encoders", None)
    if not callable(encoders):
        return {}
    names = {id(m): name for name, m in module.named_modules()}
    return {modality: names[id(encoder)] for modality, encoder in encoders().items() if id(encoder) in names}


@runtime_checkable
class ModelWrapper(Protocol):
    """Protocol of an encoder that wraps a model of another library (timm, sentence-transformers, transformers), whose
    block structure is the encoder's: :func:`~ml_optim_plugins.finetuning.encoder_blocks` (what ``"text[-2:]"`` selects) reads the
    wrapped model. :class:`~ml_optim_plugins.TimmImageEncoder` and
    :class:`~ml_optim_plugins.SentenceTransformerTextEncoder` implement it.

    Example:
        >>> class Wrapper(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
        ...     def wrapped_model(self):
        ...         return self.net
        >>> isinstance(Wrapper(), ModelWrapper), isinstance(torch.nn.Linear(2, 2), ModelWrapper)
        (True, False)
    """

    def wrapped_model(self) -> nn.Module:
        """Return the wrapped model, a sub-module of this one."""
        ...


@runtime_checkable
class FeatureCacheAware(Protocol):
    """Protocol of a module that encodes through a feature cache, which a callback may set (staged finetuning sets a
    :class:`~ml_optim_plugins.finetuning.FeatureCache` while an encoder is frozen). :class:`ModalityAwareMixin` implements it.

    Attributes:
        feature_cache: the cache to encode through, or ``None``.
    """

    feature_cache: Any

    def encode_modality(self, name: str, inputs: Any, sample_ids: Tensor | None = None) -> Tensor:
        """Return the features of one modality's batch, through ``feature_cache`` where it serves ``name``."""
        ...


@runtime_checkable
class SplittableEncoder(Protocol):
    """Protocol of an encoder that runs in two parts at a block boundary: ``forward_upper(forward_lower(x, k), k)`` is
    ``forward(x)``. When only its top blocks train, :class:`~ml_optim_plugins.finetuning.ActivationCache` keeps each sample's
    ``forward_lower`` output (the input of the first trainable block) and computes only ``forward_upper``.
    :class:`~ml_optim_plugins.TimmImageEncoder` (EfficientNet and ResNet families) and
    :class:`~ml_optim_plugins.SentenceTransformerTextEncoder` (BERT-family transformers) implement it.

    ``forward_lower`` returns a ``(batch, ...)`` tensor, or a token batch: a mapping with an ``"attention_mask"``
    ``(batch, tokens)`` whose other tensors are ``(batch, tokens, ...)``; the cache keeps each sample's unmasked tokens
    and pads them again on the right.

    Example:
        >>> class TwoLayers(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.layers = torch.nn.ModuleList([torch.nn.Linear(3, 3), torch.nn.Linear(3, 2)])
        ...     def forward(self, x):
        ...         return self.forward_upper(x, 0)
        ...     def split_blocks(self):
        ...         return list(self.layers)
        ...     def forward_lower(self, x, block):
        ...         for layer in self.layers[:block]:
        ...             x = layer(x)
        ...         return x
        ...     def forward_upper(self, h, block):
        ...         for layer in self.layers[block:]:
        ...             h = layer(h)
        ...         return h
        >>> enc, x = TwoLayers(), torch.randn(4, 3)
        >>> isinstance(enc, SplittableEncoder), torch.allclose(enc.forward_upper(enc.forward_lower(x, 1), 1), enc(x))
        (True, True)
    """

    def split_blocks(self) -> Sequence[nn.Module]:
        """Return the blocks, input first, that the split points lie between; every parameter is in one of them."""
        ...

    def forward_lower(self, inputs: Any, block: int) -> Any:
        """Return the input of block ``block``: the output of blocks ``[:block]`` (``0 < block < len(blocks)``)."""
        ...

    def forward_upper(self, hidden: Any, block: int) -> Tensor:
        """Return the encoder's output from ``hidden``, the input of block ``block``: blocks ``[block:]`` and what
        follows them (pooling, heads)."""
        ...


@runtime_checkable
class ActivationCacheAware(Protocol):
    """Protocol of a module that encodes through an activation cache, which a callback may set (staged finetuning
    sets a :class:`~ml_optim_plugins.finetuning.ActivationCache` while an encoder's lower blocks are frozen).
    :class:`ModalityAwareMixin` implements it.

    Attributes:
        activation_cache: the cache to encode through, or ``None``.
    """

    activation_cache: Any

    def encode_modality(self, name: str, inputs: Any, sample_ids: Tensor | None = None) -> Tensor:
        """Return the features of one modality's batch, through ``activation_cache`` where it serves ``name``."""
        ...


def supports_activation_cache(module: Any) -> bool:
    """Whether ``module`` implements :class:`ActivationCacheAware` (``encode_modality`` callable,
    ``activation_cache`` set).

    Example:
        >>> supports_activation_cache(torch.nn.Linear(2, 2))
        False
    """
    return isinstance(module, ActivationCacheAware) and callable(module.encode_modality)


def supports_feature_cache(module: Any) -> bool:
    """Whether ``module`` implements :class:`FeatureCacheAware` (``encode_modality`` callable, ``feature_cache`` set).

    Example:
        >>> supports_feature_cache(torch.nn.Linear(2, 2))
        False
    """
    return isinstance(module, FeatureCacheAware) and callable(module.encode_modality)


def require_modality_aware(module: Any, user: str) -> ModalityAware:
    """Return ``module`` if it implements :class:`ModalityAware`, else raise a ``TypeError`` saying what to add.

    Callbacks call this at ``setup`` so a missing contract fails before any training step.

    Args:
        module: the LightningModule (or any ``nn.Module``) a callback was attached to.
        user: the name of the caller, quoted in the error.

    Raises:
        TypeError: when ``module`` lacks ``modality_encoders()``, ``modality_logits`` or ``modality_targets``, or
            when ``modality_encoders()`` is empty or holds something that is not an ``nn.Module``.

    Example:
        >>> require_modality_aware(torch.nn.Linear(2, 2), "ModalityBalancer")
        Traceback (most recent call last):
        ...
        TypeError: ModalityBalancer needs a modality-aware module, but Linear lacks modality_encoders(), ...
    """
    missing = [
        label
        for label, attr in (
            ("modality_encoders()", "modality_encoders"),
            ("modality_logits", "modality_logits"),
            ("modality_targets", "modality_targets"),
        )
        if not hasattr(module, attr)
    ]
    if missing:
        raise TypeError(
            f"{user} needs a modality-aware module, but {type(module).__name__} lacks {', '.join(missing)}. "
            "Inherit ml_optim_plugins.ModalityAwareMixin (or implement the ModalityAware protocol): "
            "modality_encoders() -> {name: encoder module}, and after each training step modality_logits "
            "({name: (batch, classes)}) and modality_targets ((batch,))."
        )
    encoders = module.modality_encoders()
    if not isinstance(encoders, Mapping) or not encoders:
        raise TypeError(
            f"{user}: {type(module).__name__}.modality_encoders() returned {encoders!r}; expected a non-empty "
            "mapping of modality name to nn.Module"
        )
    bad = {name: type(enc).__name__ for name, enc in encoders.items() if not isinstance(enc, nn.Module)}
    if bad:
        raise TypeError(f"{user}: modality_encoders() values must be nn.Module instances, got {bad}")
    check_fusion = getattr(module, "check_fusion", None)  # ModalityAwareMixin's: can the fusion split per modality?
    if callable(check_fusion):
        check_fusion(user)
    return module


def recorded_modality_outputs(
    module: Any, modalities: Sequence[str], user: str, step: int
) -> tuple[dict[str, Tensor], Tensor]:
    """The per-modality logits (of ``modalities``) and targets that ``module``'s training step recorded.

    A callback that reads them calls this after a training step, so a module that never records them fails at its
    first step instead of training unbalanced without a word.

    Args:
        module: the modality-aware module.
        modalities: the modalities the caller needs.
        user: the name of the caller, quoted in the error.
        step: the training step, quoted in the error.

    Raises:
        RuntimeError: when ``modality_targets`` is ``None`` or ``modality_logits`` lacks one of ``modalities``, saying
            what to call in ``training_step``.

    Example:
        >>> class Silent(torch.nn.Module):
        ...     modality_logits, modality_targets = {}, None
        >>> recorded_modality_outputs(Silent(), ["image"], "ModalityBalancer", 0)
        Traceback (most recent call last):
        ...
        RuntimeError: ModalityBalancer: training step 0 of Silent recorded no per-modality predictions ...
    """
    logits, targets = module.modality_logits, module.modality_targets
    missing = [name for name in modalities if name not in logits]
    if targets is None or missing:
        what = "modality_targets is None" if targets is None else f"modality_logits lacks {missing}"
        raise RuntimeError(
            f"{user}: training step {step} of {type(module).__name__} recorded no per-modality predictions ({what}), "
            "so no modality can be measured. With ModalityAwareMixin, call self.record_modality_outputs(features, "
            "targets) in training_step; a module of your own sets self.modality_logits = {modality: (batch, "
            "classes) logits} and self.modality_targets = targets there"
        )
    return {name: logits[name] for name in modalities}, targets
