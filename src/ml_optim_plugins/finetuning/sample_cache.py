"""What the caches of staged finetuning share: rows by sample id (in memory or memory-mapped), the fingerprint of the
weights they were computed with, and the per-split, per-modality bookkeeping of a cache that serves some modalities.

:class:`~ml_optim_plugins.FeatureCache` (a frozen encoder's features) and
:class:`~ml_optim_plugins.finetuning.ActivationCache` (the activations of its frozen lower blocks) are both a
:class:`SampleCache`: each sample's value is a float32 matrix of ``dim`` columns (one row for a feature vector or an
image's activation map, one row per token for a text), stored by sample id in a :class:`SampleStore`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn


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


class _GrowableArray:
    """One array of ``(capacity, *row_shape)`` that doubles when written past its end: in memory, or the memory-mapped
    file ``{path}/{stem}-{capacity}.npy`` (the capacity in the name, so a reopened directory finds the latest)."""

    def __init__(self, path: Path | None, stem: str, row_shape: tuple[int, ...], dtype: Any, capacity: int) -> None:
        self.path, self.stem, self.row_shape, self.dtype = path, stem, row_shape, np.dtype(dtype)
        self.tensor = self._allocate(capacity)

    def _allocate(self, capacity: int) -> Tensor:
        shape = (capacity, *self.row_shape)
        if self.path is None:
            return torch.from_numpy(np.zeros(shape, self.dtype))
        self.path.mkdir(parents=True, exist_ok=True)
        return torch.from_numpy(np.lib.format.open_memmap(self._file(capacity), "w+", self.dtype, shape))

    def _file(self, capacity: int) -> Path:
        assert self.path is not None
        return self.path / f"{self.stem}-{capacity}.npy"

    @property
    def capacity(self) -> int:
        return int(self.tensor.shape[0])

    @classmethod
    def open(cls, path: Path, stem: str) -> _GrowableArray | None:
        """Reopen the array ``stem`` written to ``path`` before, or ``None``."""
        files = sorted(path.glob(f"{stem}-*.npy"), key=lambda f: int(f.stem.rsplit("-", 1)[1]))
        if not files:
            return None
        array = cls.__new__(cls)
        values = np.load(files[-1], mmap_mode="r+")
        array.path, array.stem, array.row_shape, array.dtype = path, stem, tuple(values.shape[1:]), values.dtype
        array.tensor = torch.from_numpy(values)
        return array

    def ensure(self, needed: int) -> None:
        """Grow to hold at least ``needed`` rows (to twice the capacity, or more), keeping the rows written."""
        old, capacity = self.tensor, self.capacity
        if needed <= capacity:
            return
        self.tensor = self._allocate(max(needed, 2 * capacity))
        self.tensor[:capacity] = old
        if self.path is not None:
            self._file(capacity).unlink(missing_ok=True)


class SampleStore:
    """Each sample's value, a float32 matrix of ``dim`` columns and any number of rows, by sample id.

    The rows of all samples are appended to one growing array; per sample id, where its rows start, how many there
    are and whether it is filled. In memory, or memory-mapped ``.npy`` files under ``path`` (reopened with
    :meth:`open`).

    Example:
        >>> store = SampleStore(dim=2)
        >>> store.put(torch.tensor([5, 1]), torch.arange(6.0).reshape(3, 2), torch.tensor([1, 2]))
        >>> rows, lengths = store.get(torch.tensor([1, 5]))
        >>> rows.tolist(), lengths.tolist(), store.has(torch.tensor([1, 2, 99])).tolist()
        ([[2.0, 3.0], [4.0, 5.0], [0.0, 1.0]], [2, 1], [True, False, False])
    """

    _STEMS = ("values", "start", "length", "filled")
    #: Written into a cache directory's index with each fingerprint: files of another layout are never reopened.
    FORMAT = "rows-v2"

    def __init__(self, dim: int, path: Path | None = None, capacity: int = 1, rows: int = 1) -> None:
        self.path = path
        self.values = _GrowableArray(path, "values", (dim,), np.float32, max(rows, 1))
        self.start = _GrowableArray(path, "start", (), np.int64, max(capacity, 1))
        self.length = _GrowableArray(path, "length", (), np.int64, max(capacity, 1))
        self.filled_mask = _GrowableArray(path, "filled", (), np.bool_, max(capacity, 1))
        self.used = 0  # rows written

    @classmethod
    def open(cls, path: Path) -> SampleStore | None:
        """Reopen a store written to ``path`` before, or ``None``."""
        arrays = [_GrowableArray.open(path, stem) for stem in cls._STEMS]
        if any(array is None for array in arrays):
            return None
        store = cls.__new__(cls)
        store.path = path
        store.values, store.start, store.length, store.filled_mask = arrays  # type: ignore[assignment]
        filled = store.filled_mask.tensor
        ends = store.start.tensor[filled] + store.length.tensor[filled]
        store.used = int(ends.max()) if ends.numel() else 0
        return store

    @property
    def dim(self) -> int:
        """Columns of each sample's matrix."""
        return int(self.values.row_shape[0])

    @property
    def capacity(self) -> int:
        """Sample ids the store holds without growing."""
        return self.filled_mask.capacity

    def count(self) -> int:
        """Number of samples stored."""
        return int(self.filled_mask.tensor.sum())

    def has(self, ids: Tensor) -> Tensor:
        """Whether each of ``ids`` is stored (``False`` for ids past the capacity)."""
        inside = ids < self.capacity
        out = torch.zeros(ids.shape, dtype=torch.bool)
        out[inside] = self.filled_mask.tensor[ids[inside]]
        return out

    def put(self, ids: Tensor, rows: Tensor, lengths: Tensor) -> None:
        """Store, for each of ``ids`` in order, the next ``lengths[i]`` of ``rows`` (``(sum(lengths), dim)``)."""
        if rows.ndim != 2 or rows.shape[1] != self.dim or rows.shape[0] != int(lengths.sum()):
            raise ValueError(f"SampleStore of dim {self.dim}: rows of shape {tuple(rows.shape)} for lengths summing "
                             f"to {int(lengths.sum())}")
        if not ids.numel():
            return
        for array in (self.start, self.length, self.filled_mask):
            array.ensure(int(ids.max()) + 1)
        self.values.ensure(self.used + rows.shape[0])
        lengths = lengths.to(torch.int64)
        starts = self.used + torch.cumsum(lengths, 0) - lengths
        self.values.tensor[self.used:self.used + rows.shape[0]] = rows.detach().to("cpu", torch.float32)
        self.start.tensor[ids] = starts
        self.length.tensor[ids] = lengths
        self.filled_mask.tensor[ids] = True
        self.used += rows.shape[0]

    def get(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """The rows of ``ids`` (all stored), concatenated in order, and each one's number of rows."""
        starts, lengths = self.start.tensor[ids], self.length.tensor[ids]
        if bool((lengths == 1).all()):
            return self.values.tensor[starts], lengths
        index = torch.cat([torch.arange(s, s + n) for s, n in zip(starts.tolist(), lengths.tolist())])
        return self.values.tensor[index], lengths


class SampleCache:
    """The bookkeeping shared by the caches of staged finetuning: per modality whether it is served (with the
    fingerprint of what computed its rows), per split and modality a :class:`SampleStore`, hit and miss counts, which
    stores were verified, and on disk an ``index.json`` of fingerprints (rows of other weights are deleted).

    Subclasses add how a modality is activated and how a batch is encoded through the cache.
    """

    #: The option of :class:`~ml_optim_plugins.StagedFinetuning` that creates the cache (quoted in errors).
    option = "cache"
    #: What the cache holds (quoted in errors).
    holds = "rows"

    def __init__(self, directory: str | Path | None = None, verify: bool = True) -> None:
        self.directory = None if directory is None else Path(directory)
        self.verify = verify
        self.split = "train"
        self._stores: dict[tuple[str, str], SampleStore] = {}
        self._fingerprints: dict[str, str | None] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self._verified: set[tuple[str, str]] = set()
        self._counts: dict[str, dict[str, int]] = {}

    # ------------------------------------------------------------------ lifecycle
    def _serve(self, modality: str, fingerprint: str | None) -> None:
        """Serve ``modality``; with a directory, delete the files left by a run whose fingerprint differs."""
        if self.directory is not None and fingerprint is not None:
            fingerprint = f"{SampleStore.FORMAT}/{fingerprint}"
            index = self._index()
            if index.get(modality) != fingerprint:
                self._remove_files(modality)
            index[modality] = fingerprint
            self._write_index(index)
        self._fingerprints[modality] = fingerprint
        self._counts.setdefault(modality, {"hits": 0, "misses": 0})

    def invalidate(self, modality: str) -> None:
        """Stop serving ``modality`` and drop its rows (what computed them is about to change)."""
        self._fingerprints.pop(modality, None)
        self._dtypes.pop(modality, None)
        for key in [key for key in self._stores if key[1] == modality]:
            del self._stores[key]
        self._verified = {key for key in self._verified if key[1] != modality}
        if self.directory is not None:
            self._remove_files(modality)
            index = self._index()
            index.pop(modality, None)
            self._write_index(index)

    def is_active(self, modality: str) -> bool:
        """Whether ``modality`` is served from the cache."""
        return modality in self._fingerprints

    @property
    def active(self) -> list[str]:
        """The modalities served from the cache."""
        return list(self._fingerprints)

    def stats(self) -> dict[str, dict[str, int]]:
        """Samples served from the cache (``hits``) and computed (``misses``) per modality, since the cache was
        created."""
        return {modality: dict(counts) for modality, counts in self._counts.items()}

    def filled(self, modality: str, split: str | None = None) -> int:
        """Number of samples of ``split`` (default: the current one) cached for ``modality``."""
        store = self._stores.get((split or self.split, modality))
        return 0 if store is None else store.count()

    def _require_active(self, modality: str) -> None:
        if not self.is_active(modality):
            raise RuntimeError(f"{type(self).__name__}: modality {modality!r} is not active; active: {self.active}")

    def _count(self, modality: str, hits: int, misses: int) -> None:
        self._counts[modality]["hits"] += hits
        self._counts[modality]["misses"] += misses

    def _compare(self, modality: str, cached: Tensor, fresh: Tensor) -> None:
        """Raise if the cached rows of ``modality`` differ from recomputed ones (``verify``)."""
        if cached.shape != fresh.shape:
            detail = f"shapes {tuple(cached.shape)} and {tuple(fresh.shape)}"
        elif torch.allclose(fresh.float(), cached.float(), rtol=1e-3, atol=1e-4):
            return
        else:
            detail = f"max abs difference {(fresh.float() - cached.float()).abs().max().item():.3g}"
        raise RuntimeError(
            f"{type(self).__name__}: the cached {modality!r} {self.holds} of split {self.split!r} differ from "
            f"recomputed ones ({detail}): its inputs are not deterministic (random augmentation?) or the encoder "
            "changed while frozen (dropout in train mode, updated BatchNorm statistics). Turn "
            f"{self.option} off for this data"
        )

    # ------------------------------------------------------------------ storage
    def _store(self, key: tuple[str, str]) -> SampleStore | None:
        if key not in self._stores and self.directory is not None:
            store = SampleStore.open(self._path(key))
            if store is not None:
                self._stores[key] = store
        return self._stores.get(key)

    def _new_store(self, key: tuple[str, str], dim: int, capacity: int, rows: int) -> SampleStore:
        path = None if self.directory is None else self._path(key)
        self._stores[key] = SampleStore(dim, path, capacity, rows)
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

    def __deepcopy__(self, memo: dict[int, Any]) -> SampleCache:
        # A copied module (a gradient check's float64 copy) must compute its own values, not share these rows.
        return type(self)(None, self.verify)


def fingerprint_of(modules: Iterable[nn.Module], extra: str = "") -> str:
    """One hash of the weights of ``modules`` (in order) and of ``extra``.

    Example:
        >>> a, b = nn.Linear(2, 2), nn.Linear(2, 2)
        >>> fingerprint_of([a, b], "3") == fingerprint_of([a, b], "3"), fingerprint_of([a], "3") == fingerprint_of([a])
        (True, False)
    """
    digest = hashlib.sha1(extra.encode())
    for module in modules:
        digest.update(module_fingerprint(module).encode())
    return digest.hexdigest()


def device_of(inputs: Any, encoder: Any = None) -> torch.device:
    """Where the encoder would put its output: its parameters' device, else its inputs'."""
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
