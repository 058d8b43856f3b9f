"""Fusion modules: combine per-modality features into class logits, and say what each modality alone predicts.

Every fusion owns its classification head. Besides the fused logits, each one implements
:meth:`Fusion.modality_logits`, the per-modality predictions that balancing and per-modality metrics rely on:

* :class:`ConcatFusion` and :class:`SumFusion` are linear late fusions: the fused logits are exactly the sum of
  per-modality terms, so the per-modality logits come from splitting the head (no extra compute).
* :class:`GatedFusion` mixes modalities non-linearly; there the per-modality logits are the fused head evaluated with
  every other modality's features replaced by a neutral value (zeros, or a running mean of that modality's features).
  This costs one extra head evaluation per modality, on features that are already computed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor, nn

from ml_optim_plugins.hyperparameters import check_number, check_rate

NeutralValue = Literal["zero", "mean"]


class Fusion(nn.Module):
    """Base class of fusion modules: ``forward(features) -> logits`` plus ``modality_logits(features)``.

    Layers are created by :meth:`build` once the feature size of each modality and the number of classes are known,
    so a fusion can be configured in YAML with only its own hyperparameters; :class:`MultimodalClassifier` calls
    ``build`` with its encoders' ``output_dim``. Pass ``in_dims`` and ``num_classes`` to build immediately.

    The default :meth:`modality_logits` masks the other modalities with a neutral value: zeros, or (``neutral="mean"``)
    a running mean of each modality's features updated in training. Subclasses whose logits decompose exactly
    override it.

    Subclasses take ``in_dims`` (feature size per modality) and ``num_classes`` and build at once when both are given.

    Args:
        neutral: the value that stands in for an absent modality when masking: ``"zero"`` or ``"mean"``.
        momentum: update rate of the running feature means used by ``neutral="mean"``.
    """

    def __init__(self, *, neutral: NeutralValue = "zero", momentum: float = 0.01) -> None:
        super().__init__()
        if neutral not in ("zero", "mean"):
            raise ValueError(f"neutral={neutral!r} is not supported; expected 'zero' or 'mean'")
        self.neutral = neutral
        self.momentum = check_number("momentum", momentum, above=0, at_most=1)
        self.in_dims: dict[str, int] = {}
        self.num_classes = 0

    def _build_if_given(self, in_dims: Mapping[str, int] | None, num_classes: int | None) -> None:
        """Subclasses call this last in ``__init__``: build now when both sizes were given."""
        if (in_dims is None) != (num_classes is None):
            raise ValueError("give both in_dims and num_classes to build now, or neither and call build() later")
        if in_dims is not None and num_classes is not None:
            self.build(in_dims, num_classes)

    @property
    def built(self) -> bool:
        """Whether :meth:`build` has created the layers."""
        return bool(self.in_dims)

    def build(self, in_dims: Mapping[str, int], num_classes: int) -> None:
        """Create the layers for ``in_dims`` (feature size per modality) and ``num_classes``."""
        if self.built:
            raise RuntimeError(f"{type(self).__name__} is already built for {self.in_dims}")
        if not in_dims:
            raise ValueError("in_dims is empty; a fusion needs at least one modality")
        bad = {name: dim for name, dim in in_dims.items() if not isinstance(dim, int) or dim <= 0}
        if bad:
            raise ValueError(f"feature sizes must be positive integers, got {bad}")
        if num_classes < 2:
            raise ValueError(f"num_classes={num_classes}; a classifier needs at least 2 classes")
        self.in_dims = dict(in_dims)
        self.num_classes = num_classes
        for name, dim in self.in_dims.items():
            self.register_buffer(f"_running_mean_{name}", torch.zeros(dim))
        self._build_layers()

    def _build_layers(self) -> None:
        raise NotImplementedError

    def fuse(self, features: Mapping[str, Tensor]) -> Tensor:
        """Return the fused logits; subclasses implement this."""
        raise NotImplementedError

    def forward(self, features: Mapping[str, Tensor]) -> Tensor:
        """Fused logits ``(batch, num_classes)`` from ``{modality: (batch, dim)}`` features."""
        self._check_features(features)
        if self.training and self.neutral == "mean":
            with torch.no_grad():
                for name, feat in features.items():
                    running = self.get_buffer(f"_running_mean_{name}")
                    running.lerp_(feat.detach().mean(0).to(running.dtype), self.momentum)
        return self.fuse(features)

    def neutral_features(self, name: str, like: Tensor) -> Tensor:
        """The stand-in for modality ``name`` when it is masked, shaped and typed like ``like``."""
        if self.neutral == "zero":
            return torch.zeros_like(like)
        return self.get_buffer(f"_running_mean_{name}").to(like.dtype).expand_as(like)

    #: Whether :meth:`modality_logits` splits the head exactly (a linear late fusion) rather than masking.
    exact_split: bool = False

    def modality_logits(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """What each modality alone predicts: by default :meth:`masked_logits`; fusions whose logits decompose
        exactly over the modalities override it with the exact split (and set ``exact_split``)."""
        return self.masked_logits(features)

    def masked_logits(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Per-modality logits by masking: the fused head with the other modalities set to their neutral value
        (one head evaluation per modality, with the fusion's dropout off, so the scores are deterministic and draw no
        random numbers). Meaningful for any fusion."""
        self._check_features(features)
        training = self.training
        self.eval()
        try:
            out = {}
            for name in self.in_dims:
                masked = {
                    other: feat if other == name else self.neutral_features(other, feat)
                    for other, feat in features.items()
                }
                out[name] = self.fuse(masked)
        finally:
            self.train(training)
        return out

    def _check_features(self, features: Mapping[str, Tensor]) -> None:
        if not self.built:
            raise RuntimeError(f"{type(self).__name__} is not built; call build(in_dims, num_classes) first")
        if set(features) != set(self.in_dims):
            raise KeyError(
                f"{type(self).__name__} was built for modalities {sorted(self.in_dims)}, got {sorted(features)}"
            )


def dropout_layer(dropout: nn.Module | float) -> nn.Module:
    """``nn.Dropout(rate)`` for a rate in [0, 1) (1 would zero every feature: only the head's bias would train), or
    the given module itself (e.g. ``GaussianDropout(0.1)``, which checks its own rate; an ``nn.Dropout`` is held to
    the same [0, 1))."""
    if isinstance(dropout, nn.Module):
        if isinstance(dropout, nn.Dropout):
            check_rate(dropout.p, "dropout.p")
        return dropout
    return nn.Dropout(check_rate(dropout, "dropout"))


FeatureNorm = Literal["none", "batch"]


class _LinearLateFusion(Fusion):
    """Shared constructor of the linear late fusions: sizes (optional), an optional standardisation of each modality's
    features, and a dropout on the features."""

    exact_split = True

    def __init__(
        self,
        in_dims: Mapping[str, int] | None = None,
        num_classes: int | None = None,
        *,
        dropout: nn.Module | float = 0.0,
        feature_norm: FeatureNorm = "none",
    ) -> None:
        super().__init__()
        if feature_norm not in ("none", "batch"):
            raise ValueError(f"feature_norm={feature_norm!r} is not supported; expected 'none' or 'batch'")
        self.feature_norm = feature_norm
        self.dropout = dropout_layer(dropout)
        self._build_if_given(in_dims, num_classes)

    def build(self, in_dims: Mapping[str, int], num_classes: int) -> None:
        super().build(in_dims, num_classes)
        if self.feature_norm == "batch":
            # Per-feature standardisation without a learned scale (as in MAE's linear probe): the head sees features
            # of unit spread whatever the encoder's scale (a sentence-transformer's unit-norm embeddings are ~0.05).
            self.norms = nn.ModuleDict({name: nn.BatchNorm1d(dim, affine=False) for name, dim in self.in_dims.items()})

    def normalized(self, features: Mapping[str, Tensor], *, update: bool = True) -> dict[str, Tensor]:
        """Each modality's features standardised (``feature_norm="batch"``: batch statistics in training, running
        ones in eval), or as given. ``update=False`` reads the same statistics without moving the running ones (for
        the per-modality logits of a batch whose fused forward already counted it)."""
        if self.feature_norm == "none":
            return dict(features)
        if update:
            return {name: self.norms[name](features[name]) for name in self.in_dims}
        out = {}
        for name in self.in_dims:
            # Through the module (a SyncBatchNorm that replaced it under DDP gathers the same global statistics),
            # with momentum 0 so the running statistics stay, and the batch count put back.
            norm = self.norms[name]
            momentum, count = norm.momentum, norm.num_batches_tracked.clone()
            norm.momentum = 0.0
            try:
                out[name] = norm(features[name])
            finally:
                norm.momentum = momentum
                norm.num_batches_tracked.copy_(count)
        return out


class ConcatFusion(_LinearLateFusion):
    """Concatenate the modalities' features and apply one linear head (optionally after dropout).

    Per-modality logits split the head exactly: with ``W = [W_1 | ... | W_M]``, modality ``m`` gets
    ``W_m f_m + b / M`` (the split used by OGM-GE), and the per-modality logits sum to the fused ones.

    Args:
        in_dims: feature size per modality (optional; see :class:`Fusion`).
        num_classes: number of classes (optional; see :class:`Fusion`).
        dropout: dropout on the concatenated features: a rate (``nn.Dropout``) or a module, e.g.
            ``GaussianDropout(0.1)``.
        feature_norm: ``"batch"`` standardises each modality's features before the head (``BatchNorm1d`` without a
            learned scale and shift; running statistics in eval); ``"none"`` (default) feeds them as they are.

    Example:
        >>> fusion = ConcatFusion(in_dims={"image": 4, "text": 6}, num_classes=3)
        >>> feats = {"image": torch.randn(2, 4), "text": torch.randn(2, 6)}
        >>> parts = fusion.modality_logits(feats)
        >>> torch.allclose(parts["image"] + parts["text"], fusion(feats), atol=1e-6)
        True
    """

    def _build_layers(self) -> None:
        self.head = nn.Linear(sum(self.in_dims.values()), self.num_classes)

    def fuse(self, features: Mapping[str, Tensor]) -> Tensor:
        features = self.normalized(features)
        return self.head(self.dropout(torch.cat([features[name] for name in self.in_dims], dim=-1)))

    def modality_logits(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Exact head split: ``W_m f_m + b / M`` per modality (``f_m`` standardised with ``feature_norm``)."""
        self._check_features(features)
        features = self.normalized(features, update=False)
        weights = torch.split(self.head.weight, list(self.in_dims.values()), dim=1)
        share = self.head.bias / len(self.in_dims)
        return {name: features[name] @ w.T + share for name, w in zip(self.in_dims, weights)}


class SumFusion(_LinearLateFusion):
    """One linear head per modality; the fused logits are the sum of the modalities' logits.

    Per-modality logits are each head's own output, exactly.

    Args:
        in_dims: feature size per modality (optional; see :class:`Fusion`).
        num_classes: number of classes (optional; see :class:`Fusion`).
        dropout: dropout on each modality's features: a rate (``nn.Dropout``) or a module.
        feature_norm: ``"batch"`` standardises each modality's features before its head (see :class:`ConcatFusion`).

    Example:
        >>> fusion = SumFusion(in_dims={"image": 4, "text": 6}, num_classes=3)
        >>> feats = {"image": torch.randn(2, 4), "text": torch.randn(2, 6)}
        >>> torch.allclose(sum(fusion.modality_logits(feats).values()), fusion(feats), atol=1e-6)
        True
    """

    def _build_layers(self) -> None:
        self.heads = nn.ModuleDict({name: nn.Linear(dim, self.num_classes) for name, dim in self.in_dims.items()})

    def fuse(self, features: Mapping[str, Tensor]) -> Tensor:
        features = self.normalized(features)
        return torch.stack([self.heads[name](self.dropout(features[name])) for name in self.in_dims]).sum(0)

    def modality_logits(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Each modality's own head, exactly."""
        self._check_features(features)
        features = self.normalized(features, update=False)
        return {name: self.heads[name](features[name]) for name in self.in_dims}


class GatedFusion(Fusion):
    """Gated multimodal unit (Arevalo et al. 2017): learned per-sample weights over the modalities.

    Each modality is projected to ``hidden_dim`` with ``tanh``; a gate network reads all the raw features and gives
    per-sample softmax weights over the modalities (per hidden unit); the weighted sum goes through a linear head.
    Because the gate couples the modalities, per-modality logits are obtained by masking (see :class:`Fusion`).

    Args:
        in_dims: feature size per modality (optional; see :class:`Fusion`).
        num_classes: number of classes (optional; see :class:`Fusion`).
        hidden_dim: size of the fused representation.
        dropout: dropout on the fused representation: a rate (``nn.Dropout``) or a module.
        neutral: stand-in for a masked modality: ``"zero"`` or ``"mean"`` (running mean of its features).

    Example:
        >>> fusion = GatedFusion(in_dims={"image": 4, "text": 6}, num_classes=3, hidden_dim=8)
        >>> feats = {"image": torch.randn(2, 4), "text": torch.randn(2, 6)}
        >>> fusion(feats).shape, fusion.modality_logits(feats)["text"].shape
        (torch.Size([2, 3]), torch.Size([2, 3]))
    """

    def __init__(
        self,
        in_dims: Mapping[str, int] | None = None,
        num_classes: int | None = None,
        *,
        hidden_dim: int = 128,
        dropout: nn.Module | float = 0.0,
        neutral: NeutralValue = "zero",
    ) -> None:
        if isinstance(hidden_dim, bool) or not isinstance(hidden_dim, int) or hidden_dim <= 0:
            raise ValueError(f"hidden_dim={hidden_dim!r} must be a positive integer")
        super().__init__(neutral=neutral)
        self.hidden_dim = hidden_dim
        self.dropout = dropout_layer(dropout)
        self._build_if_given(in_dims, num_classes)

    def _build_layers(self) -> None:
        self.projections = nn.ModuleDict(
            {name: nn.Linear(dim, self.hidden_dim) for name, dim in self.in_dims.items()}
        )
        self.gate = nn.Linear(sum(self.in_dims.values()), self.hidden_dim * len(self.in_dims))
        self.head = nn.Linear(self.hidden_dim, self.num_classes)

    def fuse(self, features: Mapping[str, Tensor]) -> Tensor:
        names = list(self.in_dims)
        hidden = torch.stack([torch.tanh(self.projections[n](features[n])) for n in names], dim=1)  # B x M x H
        gate_logits = self.gate(torch.cat([features[n] for n in names], dim=-1))
        gates = gate_logits.view(-1, len(names), self.hidden_dim).softmax(dim=1)
        return self.head(self.dropout((gates * hidden).sum(1)))
