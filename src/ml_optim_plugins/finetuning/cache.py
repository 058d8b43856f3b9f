"""FeatureCache: the features of frozen encoders, computed once per sample and reused while they stay frozen."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ml_optim_plugins.batch_slicing import select_samples


def module_fingerprint(module: nn.Module) -> str:
    """A hash of the parameters and buffers of ``module``: equal fingerprints mean equal features for equal inputs.

    Example:
        >>> a = nn.Linear(2, 2)
        >>> module_fingerprint(a) == module_fingerprint(a), module_fingerprint(a) == module_fingerprint(nn.Linear(2, 2))
        (True, False)
    """
    digest = hashlib.sha1()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class _Store:
    """Rows of features by sample id, with a mask of the rows filled; in memory, or memory-mapped ``.npy`` files."""

    def __init__(self, dim: int, capacity: int, path: Path | None) -> None:
        self.dim, self.path = dim, path
        self.values, self.filled = self._allocate(capacity)

    @property
    def capacity(self) -> int:
        return int(self.filled.shape[0])

    def _allocate(self, capacity: int) -> tuple[Tensor, Tensor]:
        if self.path is None:
            return torch.zeros(capacity, self.dim), torch.zeros(capacity, dtype=torch.bool)
        self.path.mkdir(parents=True, exist_ok=True)
        values = np.lib.format.open_memmap(self.path / f"values-{capacity}.npy", "w+", np.float32, (capacity, self.dim))
        filled = np.lib.format.open_memmap(self.path / f"filled-{capacity}.npy", "w+", np.bool_, (capacity,))
        return torch.from_numpy(values), torch.from_numpy(filled)

    @classmethod
    def open(cls, path: Path) -> _Store | None:
        """Reopen a store written to ``path`` before, or ``None``."""
        files = sorted(path.glob("values-*.npy"), key=lambda f: int(f.stem.split("-")[1]))
        if not files:
            return None
        capacity = int(files[-1].stem.split("-")[1])
        store = cls.__new__(cls)
        store.path = path
        values = np.load(files[-1], mmap_mode="r+")
        store.dim = int(values.shape[1])
        store.values = torch.from_numpy(values)
        store.filled = torch.from_numpy(np.load(path / f"filled-{capacity}.npy", mmap_mode="r+"))
        return store

    def grow(self, needed: int) -> None:
        old_values, old_filled, old_capacity = self.values, self.filled, self.capacity
        self.values, self.filled = self._allocate(max(needed, 2 * old_capacity))
        self.values[:old_capacity] = old_values
        self.filled[:old_capacity] = old_filled
        if self.path is not None:
            for stem in ("values", "filled"):
                (self.path / f"{stem}-{old_capacity}.npy").unlink(missing_ok=True)


class FeatureCache:
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

    def __init__(self, directory: str | Path | None = None, verify: bool = True) -> None:
        self.directory = None if directory is None else Path(directory)
        self.verify = verify
        self.split = "train"
        self._stores: dict[tuple[str, str], _Store] = {}
        self._fingerprints: dict[str, str | None] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self._verified: set[tuple[str, str]] = set()
        self._counts: dict[str, dict[str, int]] = {}

    # ------------------------------------------------------------------ lifecycle
    def activate(self, modality: str, encoder: nn.Module | None = None) -> None:
        """Serve ``modality`` from the cache from now on. With a directory, files left by a run whose encoder had
        other weights are deleted (the fingerprint of ``encoder`` decides); without one, ``encoder`` is unused."""
        if modality in self._fingerprints:
            return
        fingerprint = None
        if self.directory is not None and encoder is not None:
            fingerprint = module_fingerprint(encoder)
            index = self._index()
            if index.get(modality) != fingerprint:
                self._remove_files(modality)
            index[modality] = fingerprint
            self._write_index(index)
        self._fingerprints[modality] = fingerprint
        self._counts.setdefault(modality, {"hits": 0, "misses": 0})

    def invalidate(self, modality: str) -> None:
        """Stop serving ``modality`` and drop its features (its encoder is about to change)."""
        self._fingerprints.pop(modality, None)
        for key in [key for key in self._stores if key[1] == modality]:
            del self._stores[key]
        self._verified = {key for key in self._verified if key[1] != modality}
        if self.directory is not None:
            self._remove_files(modality)
            index = self._index()
            index.pop(modality, None)
            self._write_index(index)

    def follow_frozen(self, encoders: Mapping[str, nn.Module], trainable: Collection[int]) -> None:
        """Serve each modality whose encoder has no parameter in ``trainable`` (``id()`` s) and invalidate the others;
        call it whenever the frozen set changes."""
        for modality, encoder in encoders.items():
            ids = {id(p) for p in encoder.parameters()}
            if ids and not ids & set(trainable):
                self.activate(modality, encoder)
            elif self.is_active(modality):
                self.invalidate(modality)

    def is_active(self, modality: str) -> bool:
        """Whether ``modality`` is served from the cache."""
        return modality in self._fingerprints

    @property
    def active(self) -> list[str]:
        """The modalities served from the cache."""
        return list(self._fingerprints)

    def stats(self) -> dict[str, dict[str, int]]:
        """Samples served from the cache (``hits``) and computed by the encoder (``misses``) per modality, since the
        cache was created."""
        return {modality: dict(counts) for modality, counts in self._counts.items()}

    def filled(self, modality: str, split: str | None = None) -> int:
        """Number of samples of ``split`` (default: the current one) whose ``modality`` features are cached."""
        store = self._stores.get((split or self.split, modality))
        return 0 if store is None else int(store.filled.sum())

    # ------------------------------------------------------------------ encoding
    def encode(self, modality: str, encoder: Callable[[Any], Tensor], inputs: Any, sample_ids: Tensor) -> Tensor:
        """Features of ``inputs`` (one batch of ``modality``) whose samples are ``sample_ids``: cached rows for the
        samples seen before, ``encoder`` (without gradient) for the others, which are then cached.

        Raises:
            RuntimeError: when the modality is not active, or when ``verify`` finds that cached features differ
                from recomputed ones.
        """
        if not self.is_active(modality):
            raise RuntimeError(f"FeatureCache: modality {modality!r} is not active; active: {self.active}")
        ids = sample_ids.detach().reshape(-1).to("cpu", torch.long)
        key = (self.split, modality)
        store = self._store(key)
        if store is not None and ids.numel() and int(ids.max()) >= store.capacity:
            store.grow(int(ids.max()) + 1)
        hit = store.filled[ids] if store is not None else torch.zeros(ids.numel(), dtype=torch.bool)
        counts = self._counts[modality]
        if ids.numel() and bool(hit.all()):
            assert store is not None
            counts["hits"] += ids.numel()
            device = _device_of(inputs, encoder)
            cached = store.values[ids].to(device=device, dtype=self._dtypes.get(modality, torch.float32))
            if self.verify and key not in self._verified:
                self._check(modality, cached, encoder, inputs)
                self._verified.add(key)
            return cached
        miss = (~hit).nonzero().reshape(-1)
        with torch.no_grad():
            fresh = encoder(inputs if miss.numel() == ids.numel() else select_samples(inputs, miss))
        if fresh.ndim != 2 or fresh.shape[0] != miss.numel():
            raise RuntimeError(
                f"FeatureCache caches (batch, dim) features; the {modality!r} encoder returned shape {tuple(fresh.shape)}"
            )
        if store is None:
            store = self._new_store(key, fresh.shape[1], int(ids.max()) + 1 if ids.numel() else 1)
        self._dtypes.setdefault(modality, fresh.dtype)
        store.values[ids[miss]] = fresh.detach().to("cpu", torch.float32)
        store.filled[ids[miss]] = True
        counts["misses"] += miss.numel()
        counts["hits"] += ids.numel() - miss.numel()
        if miss.numel() == ids.numel():
            return fresh
        out = torch.empty(ids.numel(), fresh.shape[1], device=fresh.device, dtype=fresh.dtype)
        out[miss.to(fresh.device)] = fresh
        hit_rows = hit.nonzero().reshape(-1)
        cached = store.values[ids[hit_rows]].to(fresh.device, fresh.dtype)
        if self.verify and key not in self._verified:  # e.g. rows left on disk by a run on other data
            self._check(modality, cached, encoder, select_samples(inputs, hit_rows))
            self._verified.add(key)
        out[hit_rows.to(fresh.device)] = cached
        return out

    def _check(self, modality: str, cached: Tensor, encoder: Callable[[Any], Tensor], inputs: Any) -> None:
        with torch.no_grad():
            fresh = encoder(inputs)
        if not torch.allclose(fresh.float(), cached.float(), rtol=1e-3, atol=1e-4):
            error = (fresh.float() - cached.float()).abs().max().item()
            raise RuntimeError(
                f"FeatureCache: the cached {modality!r} features of split {self.split!r} differ from recomputed ones "
                f"(max abs difference {error:.3g}): its inputs are not deterministic (random augmentation?) or the "
                "encoder changed while frozen (dropout in train mode, updated BatchNorm statistics). Turn "
                "cache_features off for this data"
            )

    # ------------------------------------------------------------------ storage
    def _store(self, key: tuple[str, str]) -> _Store | None:
        if key not in self._stores and self.directory is not None:
            store = _Store.open(self._path(key))
            if store is not None:
                self._stores[key] = store
        return self._stores.get(key)

    def _new_store(self, key: tuple[str, str], dim: int, capacity: int) -> _Store:
        path = None if self.directory is None else self._path(key)
        self._stores[key] = _Store(dim, capacity, path)
        return self._stores[key]

    def _path(self, key: tuple[str, str]) -> Path:
        assert self.directory is not None
        return self.directory / key[1] / key[0]

    def _index(self) -> dict[str, str]:
        assert self.directory is not None
        path = self.directory / "index.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def _write_index(self, index: dict[str, str]) -> None:
        assert self.directory is not None
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "index.json").write_text(json.dumps(index, indent=1))

    def _remove_files(self, modality: str) -> None:
        assert self.directory is not None
        shutil.rmtree(self.directory / modality, ignore_errors=True)

    def __deepcopy__(self, memo: dict[int, Any]) -> FeatureCache:
        # A copied module (a gradient check's float64 copy) must compute its features, not share these rows.
        return FeatureCache(None, self.verify)


def _device_of(inputs: Any, encoder: Any = None) -> torch.device:
    """Where the encoder would put its features: its parameters' device, else its inputs'."""
    if isinstance(encoder, nn.Module):
        for tensor in (*encoder.parameters(), *encoder.buffers()):
            return tensor.device
    if isinstance(inputs, Tensor):
        return inputs.device
    if isinstance(inputs, dict):
        for value in inputs.values():
            if isinstance(value, Tensor):
                return value.device
    return torch.device("cpu")
