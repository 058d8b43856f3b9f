"""FeatureCache: the features of frozen encoders, computed once per sample and reused while they stay frozen."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ml_optim_plugins.batch_slicing import select_samples
from ml_optim_plugins.finetuning.sample_cache import SampleCache, SampleStore, device_of, module_fingerprint

__all__ = ["FeatureCache", "module_fingerprint"]


class FeatureCache(SampleCache):
    """Features of frozen encoders by sample, computed on first sight and reused until the encoder is unfrozen.

    While an encoder is frozen and its inputs are deterministic, its output for a sample never changes.
    :class:`~ml_optim_plugins.StagedFinetuning` (``cache_features=True``) creates the cache, activates it per modality
    while that encoder is frozen and invalidates it when the encoder is unfrozen; modules encode through it with
    :meth:`~ml_optim_plugins.ModalityAwareMixin.encode_modality`. Features are float32 rows by split, modality and
    sample id, in memory or in memory-mapped files reused only for the same encoder weights (docs/finetuning.md).

    Args:
        directory: where to keep the features on disk (one per data set, and per process under DDP); ``None``: in
            memory.
        verify: on the first batch served (entirely or partly) from the cache, per split and modality, recompute the
            cached features and raise if they differ: it catches random augmentation, an encoder that is not really
            frozen, and files in ``directory`` left by a run on other data.

    Example:
        >>> cache = FeatureCache()
        >>> encoder = nn.Linear(3, 2).eval().requires_grad_(False)
        >>> cache.activate("x", encoder)
        >>> x, ids = torch.randn(4, 3), torch.tensor([10, 11, 12, 13])
        >>> first = cache.encode("x", encoder, x, ids)
        >>> again = cache.encode("x", encoder, x, ids)
        >>> torch.equal(first, again), cache.stats()["x"]
        (True, {'hits': 4, 'misses': 4})
    """

    option = "cache_features"
    holds = "features"

    # ------------------------------------------------------------------ lifecycle
    def activate(self, modality: str, encoder: nn.Module | None = None) -> None:
        """Serve ``modality`` from the cache from now on. With a directory, files left by a run whose encoder had
        other weights are deleted (the fingerprint of ``encoder`` decides); without one, ``encoder`` is unused."""
        if modality in self._fingerprints:
            return
        use_fingerprint = self.directory is not None and encoder is not None
        self._serve(modality, module_fingerprint(encoder) if use_fingerprint else None)

    def follow_frozen(self, encoders: Mapping[str, nn.Module], trainable: Collection[int]) -> None:
        """Serve each modality whose encoder has no parameter in ``trainable`` (``id()`` s) and invalidate the others;
        call it whenever the frozen set changes."""
        for modality, encoder in encoders.items():
            if entirely_frozen(encoder, trainable):
                self.activate(modality, encoder)
            elif self.is_active(modality):
                self.invalidate(modality)

    # ------------------------------------------------------------------ encoding
    def encode(self, modality: str, encoder: Callable[[Any], Tensor], inputs: Any, sample_ids: Tensor) -> Tensor:
        """Features of ``inputs`` (one batch of ``modality``) whose samples are ``sample_ids``: cached rows for the
        samples seen before, ``encoder`` (without gradient) for the others, which are then cached.

        Raises:
            RuntimeError: when the modality is not active, or when ``verify`` finds that cached features differ
                from recomputed ones.
        """
        self._require_active(modality)
        ids = sample_ids.detach().reshape(-1).to("cpu", torch.long)
        key = (self.split, modality)
        store = self._store(key)
        hit = store.has(ids) if store is not None else torch.zeros(ids.numel(), dtype=torch.bool)
        if ids.numel() and bool(hit.all()):
            assert store is not None
            self._count(modality, ids.numel(), 0)
            cached = self._cached(store, ids, modality, device_of(inputs, encoder))
            self._verify_once(key, cached, encoder, inputs)
            return cached
        miss = (~hit).nonzero().reshape(-1)
        with torch.no_grad():
            fresh = encoder(inputs if miss.numel() == ids.numel() else select_samples(inputs, miss))
        if fresh.ndim != 2 or fresh.shape[0] != miss.numel():
            raise RuntimeError(
                f"FeatureCache caches (batch, dim) features; the {modality!r} encoder returned shape {tuple(fresh.shape)}"
            )
        if store is None:
            store = self._new_store(key, fresh.shape[1], int(ids.max()) + 1, ids.numel())
        self._dtypes.setdefault(modality, fresh.dtype)
        store.put(ids[miss], fresh, torch.ones(miss.numel(), dtype=torch.long))
        self._count(modality, ids.numel() - miss.numel(), miss.numel())
        if miss.numel() == ids.numel():
            return fresh
        out = torch.empty(ids.numel(), fresh.shape[1], device=fresh.device, dtype=fresh.dtype)
        out[miss.to(fresh.device)] = fresh
        hit_rows = hit.nonzero().reshape(-1)
        cached = self._cached(store, ids[hit_rows], modality, fresh.device)
        self._verify_once(key, cached, encoder, select_samples(inputs, hit_rows))  # e.g. rows on disk from other data
        out[hit_rows.to(fresh.device)] = cached
        return out

    def _cached(self, store: SampleStore, ids: Tensor, modality: str, device: torch.device) -> Tensor:
        rows, _ = store.get(ids)
        return rows.to(device=device, dtype=self._dtypes.get(modality, torch.float32))

    def _verify_once(self, key: tuple[str, str], cached: Tensor, encoder: Callable[[Any], Tensor], inputs: Any) -> None:
        """With ``verify``, on the first batch served from the store ``key``: recompute and compare."""
        if not self.verify or key in self._verified:
            return
        with torch.no_grad():
            self._compare(key[1], cached, encoder(inputs))
        self._verified.add(key)


def entirely_frozen(encoder: nn.Module, trainable: Collection[int]) -> bool:
    """Whether ``encoder`` has parameters and none of them is in ``trainable`` (``id()`` s): the encoders whose
    features :class:`FeatureCache` serves."""
    ids = {id(p) for p in encoder.parameters()}
    return bool(ids) and not ids & set(trainable)
