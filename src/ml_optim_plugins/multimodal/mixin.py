"""ModalityAwareMixin: the modality contract implemented for a module with ``self.encoders`` and ``self.fusion``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ml_optim_plugins.multimodal.contract import MODALITY_SCORINGS


class ModalityAwareMixin:
    """Implements :class:`~ml_optim_plugins.multimodal.contract.ModalityAware` for a module with ``self.encoders`` (``nn.ModuleDict``) and ``self.fusion``.

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

        Callbacks call it at ``setup`` (through :func:`~ml_optim_plugins.multimodal.contract.require_modality_aware`), so a plain head such as
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
