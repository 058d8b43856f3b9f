"""The modality contract shared by every modality-aware callback.

A module is *modality-aware* when it says which sub-module encodes each modality and, after each training step, what
each modality alone predicts. Balancing, per-modality gradient health and staged finetuning read only this contract,
so they work on a user's own LightningModule as well as on :class:`~ml_optim_plugins.MultimodalClassifier`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
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
    if isinstance(module, ModalityAwareMixin):
        module.check_fusion(user)
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


class ModalityAwareMixin:
    """Implements :class:`ModalityAware` for a module with ``self.encoders`` (``nn.ModuleDict``) and ``self.fusion``.

    Call :meth:`record_modality_outputs` in ``training_step`` with the encoder features and the targets; it asks the
    fusion for per-modality logits (exact head split for linear late fusions, masking for the others; see
    :class:`~ml_optim_plugins.Fusion`) and keeps them, detached, for callbacks.

    Example:
        >>> from ml_optim_plugins import ConcatFusion
        >>> class TwoTower(ModalityAwareMixin, torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.encoders = torch.nn.ModuleDict({"a": torch.nn.Linear(4, 3), "b": torch.nn.Linear(5, 2)})
        ...         self.fusion = ConcatFusion(in_dims={"a": 3, "b": 2}, num_classes=2)
        >>> m = TwoTower()
        >>> feats = {"a": m.encoders["a"](torch.randn(8, 4)), "b": m.encoders["b"](torch.randn(8, 5))}
        >>> m.record_modality_outputs(feats, torch.zeros(8, dtype=torch.long))
        >>> sorted(m.modality_logits), m.modality_logits["a"].shape
        (['a', 'b'], torch.Size([8, 2]))
    """

    encoders: nn.ModuleDict
    fusion: nn.Module
    #: The batch key of the sample ids that :meth:`encode_modality` gives a feature cache.
    sample_id_key: str = "index"
    #: How :meth:`record_modality_outputs` gets per-modality logits; see :meth:`set_modality_scoring`.
    modality_scoring: str = "auto"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.modality_logits: dict[str, Tensor] = {}
        self.modality_targets: Tensor | None = None
        #: A :class:`~ml_optim_plugins.finetuning.FeatureCache` set by :class:`~ml_optim_plugins.StagedFinetuning`, or ``None``.
        self.feature_cache: Any = None
        #: An :class:`~ml_optim_plugins.finetuning.ActivationCache` set by :class:`~ml_optim_plugins.StagedFinetuning`, or
        #: ``None``.
        self.activation_cache: Any = None
        #: Unimodal losses of the last training step, with their graphs (for MMPareto), if the module has them.
        self.modality_losses: dict[str, Tensor] = {}

    def set_modality_scoring(self, scoring: str) -> None:
        """Choose how each modality's own prediction is obtained.

        * ``"head_split"``: the fusion's exact split of its linear head (``ConcatFusion``, ``SumFusion``); an error for
          a fusion whose head couples the modalities (``GatedFusion``), where a split would be silently wrong;
        * ``"masking"``: the fused head with the other modalities replaced by a neutral value (any fusion; one head
          evaluation per modality);
        * ``"aux_heads"``: the module's own unimodal heads (``aux_heads``, e.g. ``MultimodalClassifier(aux_loss_weight>0)``);
        * ``"auto"``: the split where it is exact, masking otherwise.

        Raises:
            ValueError: an unknown choice, or one that is meaningless for this module, saying what to use instead.
        """
        if scoring not in MODALITY_SCORINGS:
            raise ValueError(f"modality scoring {scoring!r}; expected one of {', '.join(MODALITY_SCORINGS)}")
        fusion = type(self.fusion).__name__
        if scoring == "head_split" and not getattr(self.fusion, "exact_split", False):
            raise ValueError(
                f"{fusion} couples the modalities before its head, so splitting the head per modality is meaningless; "
                "use 'masking' (or 'aux_heads' with unimodal heads)"
            )
        if scoring == "aux_heads" and getattr(self, "aux_heads", None) is None:
            raise ValueError(
                "'aux_heads' scoring needs unimodal heads: MultimodalClassifier(aux_loss_weight=...) with a weight > 0, "
                "or an nn.ModuleDict aux_heads {modality: head} in your module"
            )
        self.modality_scoring = scoring

    def encode_modality(self, name: str, inputs: Any, sample_ids: Tensor | None = None) -> Tensor:
        """Features of one modality's batch: from ``self.feature_cache`` while it serves this modality (a frozen
        encoder), from ``self.activation_cache`` while it serves it (frozen lower blocks: only the top ones run),
        else from the encoder.

        Raises:
            KeyError: when a cache serves ``name`` but the batch has no sample ids (``sample_id_key``).
        """
        encoder = self.encoders[name]
        for label, cache in (("feature", self.feature_cache), ("activation", getattr(self, "activation_cache", None))):
            if cache is None or not cache.is_active(name):
                continue
            if sample_ids is None:
                raise KeyError(
                    f"the {label} cache serves modality {name!r}, but the batch has no sample ids under "
                    f"{self.sample_id_key!r}; the library's data modules add them, your own must too (the dataset "
                    "index)"
                )
            return cache.encode(name, encoder, inputs, sample_ids)
        return encoder(inputs)

    def modality_encoders(self) -> Mapping[str, nn.Module]:
        """Return ``self.encoders`` as a plain ``{modality: encoder}`` mapping."""
        return dict(self.encoders.items())

    def check_fusion(self, user: str = "ModalityAwareMixin") -> None:
        """Raise a ``TypeError`` unless :meth:`modality_outputs` can ask ``self.fusion`` for per-modality logits.

        Callbacks call it at ``setup`` (through :func:`require_modality_aware`), so a plain head such as
        ``nn.Linear`` under the name ``fusion`` fails before the first step, saying what to implement.

        Raises:
            TypeError: when ``self.fusion`` is missing or is not a :class:`~ml_optim_plugins.Fusion` (it lacks
                ``modality_logits`` / ``masked_logits``) and neither :meth:`modality_outputs` is overridden nor the
                scoring is ``"aux_heads"``.
        """
        overridden = type(self).modality_outputs is not ModalityAwareMixin.modality_outputs
        if overridden or self.modality_scoring == "aux_heads":
            return
        fusion = getattr(self, "fusion", None)
        if all(callable(getattr(fusion, name, None)) for name in ("modality_logits", "masked_logits")):
            return
        found = "has no attribute 'fusion'" if fusion is None else f"has fusion = {type(fusion).__name__}"
        raise TypeError(
            f"{user}: ModalityAwareMixin asks self.fusion for each modality's logits, but {type(self).__name__} "
            f"{found}, not an ml_optim_plugins Fusion (ConcatFusion, SumFusion, GatedFusion or a Fusion subclass). "
            "Use a Fusion as self.fusion, override modality_outputs(features) -> {modality: (batch, classes) logits}, "
            "or drop the mixin and implement the ModalityAware protocol yourself (docs/index.md shows both ways)"
        )

    def modality_outputs(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """What each modality alone predicts from ``features``, as :attr:`modality_scoring` says (the same on every
        split, so training and validation per-modality metrics measure the same thing).

        Raises:
            TypeError: as :meth:`check_fusion`, for a ``fusion`` that is not a :class:`~ml_optim_plugins.Fusion`.
        """
        self.check_fusion()
        if self.modality_scoring == "masking":
            return self.fusion.masked_logits(features)
        if self.modality_scoring == "aux_heads":
            return {name: head(features[name]) for name, head in self.aux_heads.items()}
        return self.fusion.modality_logits(features)

    @torch.no_grad()
    def record_modality_outputs(self, features: Mapping[str, Tensor], targets: Tensor) -> None:
        """Compute and keep the per-modality logits and targets of the current training step (no gradient), as
        :attr:`modality_scoring` says."""
        self.modality_logits = {name: value.detach() for name, value in self.modality_outputs(features).items()}
        self.modality_targets = targets.detach()
