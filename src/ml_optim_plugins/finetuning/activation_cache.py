"""ActivationCache: the activations of an encoder's frozen lower blocks, computed once per sample and reused while
only its top blocks train (the :class:`~ml_optim_plugins.FeatureCache` idea, one level down)."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ml_optim_plugins.batch_slicing import select_samples, slice_batch
from ml_optim_plugins.finetuning.sample_cache import SampleCache, SampleStore, device_of, fingerprint_of
from ml_optim_plugins.multimodal.contract import SplittableEncoder

MASK = "attention_mask"


def split_point(encoder: nn.Module, trainable: Collection[int]) -> int:
    """How many blocks of ``encoder`` (:meth:`~ml_optim_plugins.multimodal.contract.SplittableEncoder.split_blocks`),
    from the input, have no parameter in ``trainable`` (``id()`` s): the block at which the trainable part starts.

    Raises:
        TypeError: ``encoder`` does not implement :class:`~ml_optim_plugins.multimodal.contract.SplittableEncoder`
            (or its ``split_blocks`` refuses this architecture).
        ValueError: ``split_blocks()`` leaves parameters of ``encoder`` out, naming them.

    Example:
        >>> from ml_optim_plugins import TimmImageEncoder
        >>> encoder = TimmImageEncoder("resnet10t")
        >>> top = {id(p) for p in encoder.model.layer4.parameters()}
        >>> block = split_point(encoder, top)
        >>> block, type(encoder.split_blocks()[block]).__name__
        (7, 'BasicBlock')
    """
    blocks = list(_splittable(encoder).split_blocks())
    covered = {id(p) for block in blocks for p in block.parameters()}
    left_out = [name for name, p in encoder.named_parameters() if id(p) not in covered]
    if left_out:
        raise ValueError(f"{type(encoder).__name__}.split_blocks() leaves out parameters {left_out[:5]}; every "
                         "parameter must be in one block")
    trainable = set(trainable)
    return next((i for i, block in enumerate(blocks) if any(id(p) in trainable for p in block.parameters())),
                len(blocks))


def _splittable(encoder: nn.Module) -> SplittableEncoder:
    if not isinstance(encoder, SplittableEncoder):
        raise TypeError(
            f"{type(encoder).__name__} cannot be split into frozen lower and trainable upper blocks: implement "
            "split_blocks(), forward_lower(inputs, block) and forward_upper(hidden, block) "
            "(ml_optim_plugins.multimodal.contract.SplittableEncoder), or turn cache_activations off"
        )
    return encoder


def activation_splits(encoders: Mapping[str, nn.Module], trainable: Collection[int]) -> dict[str, int]:
    """``{modality: block}`` for each encoder that is partly frozen with frozen lower blocks: the split point at
    which an :class:`ActivationCache` serves it (:func:`split_point`). Entirely frozen or entirely trainable
    encoders, and partly frozen ones whose first block trains, are left out.

    Raises:
        TypeError, ValueError: as :func:`split_point`, for a partly frozen encoder that cannot be split.

    Example:
        >>> from ml_optim_plugins import TimmImageEncoder
        >>> image, frozen = TimmImageEncoder("resnet10t"), TimmImageEncoder("resnet10t")
        >>> activation_splits({"image": image, "other": frozen}, {id(p) for p in image.model.layer4.parameters()})
        {'image': 7}
    """
    splits = {}
    trainable = set(trainable)
    for modality, encoder in encoders.items():
        ids = {id(p) for p in encoder.parameters()}
        if not ids & trainable or ids <= trainable:
            continue
        try:
            block = split_point(encoder, trainable)
        except (TypeError, ValueError) as err:
            raise type(err)(f"the {modality!r} encoder: {err}") from err
        if block > 0:
            splits[modality] = block
    return splits


@dataclass(frozen=True)
class _Layout:
    """How a batch of lower-block outputs is cut into per-sample rows: a tensor of per-sample ``shape``, or a token
    batch whose tensors ``keys`` have per-token ``shapes`` (and an attention mask of ``mask_dtype``)."""

    shape: tuple[int, ...] | None = None
    keys: tuple[str, ...] = ()
    shapes: tuple[tuple[int, ...], ...] = ()
    mask_dtype: torch.dtype | None = None

    @classmethod
    def of(cls, hidden: Any) -> _Layout:
        if isinstance(hidden, Tensor):
            return cls(shape=tuple(hidden.shape[1:]))
        if isinstance(hidden, Mapping) and isinstance(hidden.get(MASK), Tensor) and hidden[MASK].ndim == 2:
            keys = tuple(key for key in hidden if key != MASK)
            if keys and all(isinstance(hidden[k], Tensor) and hidden[k].shape[:2] == hidden[MASK].shape for k in keys):
                return cls(keys=keys, shapes=tuple(tuple(hidden[k].shape[2:]) for k in keys),
                           mask_dtype=hidden[MASK].dtype)
        raise TypeError(
            "ActivationCache caches a (batch, ...) tensor or a token batch (a mapping with an 'attention_mask' "
            f"(batch, tokens) and (batch, tokens, ...) tensors); forward_lower returned {_describe(hidden)}"
        )

    def to_rows(self, hidden: Any) -> tuple[Tensor, Tensor]:
        """``(rows, lengths)``: each sample's rows (one for a tensor, one per unmasked token), concatenated."""
        if self.shape is not None:
            return hidden.reshape(hidden.shape[0], -1), torch.ones(hidden.shape[0], dtype=torch.long)
        valid = hidden[MASK].bool()
        rows = torch.cat([hidden[key][valid].reshape(int(valid.sum()), -1) for key in self.keys], dim=1)
        return rows, valid.sum(dim=1).to("cpu", torch.long)

    def from_rows(self, rows: Tensor, lengths: Tensor) -> Any:
        """The batch of :meth:`to_rows`, token batches padded on the right to their longest sample."""
        if self.shape is not None:
            return rows.reshape(rows.shape[0], *self.shape)
        lengths = lengths.to(rows.device)
        width = int(lengths.max()) if lengths.numel() else 0
        valid = torch.arange(width, device=rows.device) < lengths[:, None]
        out: dict[str, Tensor] = {}
        offset = 0
        for key, shape in zip(self.keys, self.shapes):
            size = math.prod(shape)
            padded = rows.new_zeros(lengths.numel(), width, size)
            padded[valid] = rows[:, offset:offset + size]
            out[key] = padded.reshape(lengths.numel(), width, *shape)
            offset += size
        out[MASK] = valid.to(self.mask_dtype)
        return out


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, Mapping):
        return f"a mapping with keys {sorted(value)}"
    return type(value).__name__


class ActivationCache(SampleCache):
    """The input of an encoder's first trainable block by sample, computed on first sight and reused while the blocks
    below it stay frozen; only the trainable blocks run.

    When a stage trains only an encoder's top blocks, its frozen lower blocks compute the same activations for a
    sample in every epoch (deterministic inputs, frozen blocks in ``eval()``).
    :class:`~ml_optim_plugins.StagedFinetuning` (``cache_activations=True``) creates the cache, activates it per
    modality at the split point of each stage (:func:`activation_splits`) and invalidates it when a stage moves the
    split point. The encoder must implement :class:`~ml_optim_plugins.multimodal.contract.SplittableEncoder`.
    Activations are float32 rows by split, modality and sample id (a token batch: one row per unmasked token), in
    memory or in memory-mapped files reused only for the same lower-block weights and split point
    (docs/finetuning.md).

    Args:
        directory: where to keep the activations on disk (one per data set, and per process under DDP); ``None``:
            in memory.
        verify: once per activation, check on a few samples that ``forward_upper`` of the cached activations
            reproduces ``forward`` (in ``eval()``); and on the first batch served (entirely or partly) from the
            cache, per split and modality, recompute the lower blocks and raise if they differ (random
            augmentation, files left by a run on other data).

    Example:
        >>> from ml_optim_plugins import TimmImageEncoder
        >>> encoder = TimmImageEncoder("resnet10t")
        >>> lower = encoder.split_blocks()[:7]
        >>> for block in lower:
        ...     _ = block.eval().requires_grad_(False)
        >>> cache = ActivationCache()
        >>> cache.activate("image", encoder, block=7)
        >>> x, ids = torch.randn(2, 3, 64, 64), torch.tensor([0, 1])
        >>> first = cache.encode("image", encoder, x, ids)
        >>> again = cache.encode("image", encoder, x, ids)
        >>> torch.allclose(first, again), cache.stats()["image"], again.requires_grad
        (True, {'hits': 2, 'misses': 2}, True)
    """

    option = "cache_activations"
    holds = "activations"

    def __init__(self, directory: Any = None, verify: bool = True) -> None:
        super().__init__(directory, verify)
        self._blocks: dict[str, int] = {}
        self._layouts: dict[str, _Layout] = {}
        self._split_checked: set[str] = set()

    # ------------------------------------------------------------------ lifecycle
    def activate(self, modality: str, encoder: nn.Module, block: int) -> None:
        """Serve ``modality`` from the cache, split at ``block`` of ``encoder.split_blocks()`` (its lower blocks
        frozen). A modality served at another block is invalidated first. With a directory, files left by a run with
        other lower-block weights or another split point are deleted.

        Raises:
            TypeError: ``encoder`` is not a :class:`~ml_optim_plugins.multimodal.contract.SplittableEncoder`.
            ValueError: ``block`` is not strictly inside the encoder's blocks.
        """
        if self._blocks.get(modality) == block:
            return
        blocks = list(_splittable(encoder).split_blocks())
        if not 0 < block < len(blocks):
            raise ValueError(f"ActivationCache: block {block} of the {modality!r} encoder; expected 1 to "
                             f"{len(blocks) - 1} (it has {len(blocks)} blocks: the cache serves the blocks below it)")
        if self.is_active(modality):
            self.invalidate(modality)
        fingerprint = None
        if self.directory is not None:
            fingerprint = fingerprint_of(blocks[:block], f"{type(encoder).__name__}/{block}")
        self._serve(modality, fingerprint)
        self._blocks[modality] = block

    def invalidate(self, modality: str) -> None:
        """Stop serving ``modality`` and drop its activations (its split point or lower blocks are about to
        change)."""
        self._blocks.pop(modality, None)
        self._layouts.pop(modality, None)
        self._split_checked.discard(modality)
        super().invalidate(modality)

    def follow_frozen(self, encoders: Mapping[str, nn.Module], trainable: Collection[int]) -> None:
        """Serve each partly frozen encoder at its split point (:func:`activation_splits`) and invalidate the other
        modalities and those whose split point moved; call it whenever the frozen set changes."""
        splits = activation_splits(encoders, trainable)
        for modality in [m for m in self.active if m not in splits]:
            self.invalidate(modality)
        for modality, block in splits.items():
            self.activate(modality, encoders[modality], block)

    @property
    def splits(self) -> dict[str, int]:
        """``{modality: block}`` of the modalities served: the cache holds the input of that block."""
        return dict(self._blocks)

    def frozen_blocks(self, encoders: Mapping[str, nn.Module]) -> list[nn.Module]:
        """The lower blocks of the modalities served (of ``encoders``): the modules to keep in ``eval()``."""
        return [m for modality, block in self._blocks.items() for m in encoders[modality].split_blocks()[:block]]

    # ------------------------------------------------------------------ encoding
    def encode(self, modality: str, encoder: nn.Module, inputs: Any, sample_ids: Tensor) -> Tensor:
        """The output of ``encoder`` for ``inputs`` (one batch of ``modality``, samples ``sample_ids``), with
        gradients through its upper blocks: the lower blocks' activations come from the cache for samples seen
        before, and from ``forward_lower`` (without gradient) for the others, which are then cached.

        Raises:
            RuntimeError: the modality is not active; a lower block is in train mode; ``verify`` finds that
                ``forward_upper`` of the split does not reproduce ``forward``, or that cached activations differ from
                recomputed ones.
        """
        self._require_active(modality)
        block = self._blocks[modality]
        self._check_eval(modality, encoder, block)
        ids = sample_ids.detach().reshape(-1).to("cpu", torch.long)
        if self.verify and modality not in self._split_checked:
            self._check_split(modality, encoder, inputs, block)
            self._split_checked.add(modality)
        key = (self.split, modality)
        store = self._store(key)
        hit = store.has(ids) if store is not None else torch.zeros(ids.numel(), dtype=torch.bool)
        miss = (~hit).nonzero().reshape(-1)
        fresh = None
        if miss.numel():
            with torch.no_grad():
                fresh = encoder.forward_lower(inputs if miss.numel() == ids.numel() else select_samples(inputs, miss),
                                              block)
            layout = self._layouts.setdefault(modality, _Layout.of(fresh))
            rows, lengths = layout.to_rows(fresh)
            if store is None:
                store = self._new_store(key, rows.shape[1], int(ids.max()) + 1, rows.shape[0])
            self._dtypes.setdefault(modality, rows.dtype)
            store.put(ids[miss], rows, lengths)
        self._count(modality, ids.numel() - miss.numel(), miss.numel())
        if fresh is not None and miss.numel() == ids.numel():
            return encoder.forward_upper(fresh, block)  # exactly what the encoder computes without the cache
        assert store is not None
        if modality not in self._layouts:  # every sample from files of an earlier run: learn the layout on one
            with torch.no_grad():
                probe = encoder.forward_lower(select_samples(inputs, torch.arange(1)), block)
            self._layouts[modality] = _Layout.of(probe)
            self._dtypes[modality] = self._layouts[modality].to_rows(probe)[0].dtype
        if self.verify and key not in self._verified:
            hit_rows = hit.nonzero().reshape(-1)
            self._check_rows(modality, store, ids[hit_rows], encoder, select_samples(inputs, hit_rows), block)
            self._verified.add(key)
        rows, lengths = store.get(ids)
        device = device_of(inputs, encoder)
        hidden = self._layouts[modality].from_rows(rows.to(device, self._dtypes[modality]), lengths)
        return encoder.forward_upper(hidden, block)

    def _check_eval(self, modality: str, encoder: nn.Module, block: int) -> None:
        """Raise if a module of the frozen lower blocks is in train mode (its output could vary: dropout, BatchNorm
        statistics)."""
        training = [m for lower in encoder.split_blocks()[:block] for m in lower.modules() if m.training]
        if training:
            names = {id(m): name for name, m in encoder.named_modules()}
            found = [f"{names.get(id(m), '?')} ({type(m).__name__})" for m in training[:3]]
            raise RuntimeError(
                f"ActivationCache: the {modality!r} encoder's frozen blocks below block {block} must be in eval() to "
                f"be cached, but {found} are in train mode (dropout and BatchNorm would change their output). "
                "StagedFinetuning keeps them in eval(); if you switch modes yourself (model.train() in a step), keep "
                "these in eval() or turn cache_activations off"
            )

    def _check_split(self, modality: str, encoder: nn.Module, inputs: Any, block: int) -> None:
        """Raise unless ``forward_upper`` of the cached form of ``forward_lower`` gives ``forward`` (in ``eval()``) on
        the batch's first samples."""
        sample = slice_batch(inputs, 4)
        modes = [(m, m.training) for m in encoder.modules()]
        encoder.eval()
        try:
            with torch.no_grad():
                expected = encoder(sample)
                hidden = encoder.forward_lower(sample, block)
                layout = _Layout.of(hidden)
                got = encoder.forward_upper(layout.from_rows(*layout.to_rows(hidden)), block)
        finally:
            for module, mode in modes:
                module.train(mode)
        if got.shape != expected.shape or not torch.allclose(got.float(), expected.float(), rtol=1e-3, atol=1e-4):
            raise RuntimeError(
                f"ActivationCache: {type(encoder).__name__}.forward_upper(forward_lower(x, {block}), {block}) does not "
                f"reproduce forward(x) for the {modality!r} encoder (shapes {tuple(got.shape)} and "
                f"{tuple(expected.shape)}); fix its split, or turn cache_activations off"
            )

    def _check_rows(
        self, modality: str, store: SampleStore, ids: Tensor, encoder: nn.Module, inputs: Any, block: int
    ) -> None:
        with torch.no_grad():
            fresh, _ = self._layouts[modality].to_rows(encoder.forward_lower(inputs, block))
        cached, _ = store.get(ids)
        self._compare(modality, cached, fresh.cpu())

