"""Common LightningDataModule for image + text classification data."""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, Sampler

from ml_optim_plugins.data.collate import MultimodalCollate, load_tokenizer


class MultimodalDataModule(pl.LightningDataModule):
    """Base of the library's data modules: batches of ``{"image", "text", "label", "index"}`` with texts tokenised
    (``index``: each sample's position in its split, the sample id of feature caches).

    Subclasses fill ``self.datasets`` (``"train"``, ``"val"``, ``"test"``) in ``setup`` and define
    :attr:`class_names`. ``num_classes`` is known as soon as the data module is built, so LightningCLI links it to the
    model's ``num_classes``.

    Args:
        batch_size: samples per batch (per process under DDP).
        num_workers: DataLoader worker processes.
        tokenizer: the text model whose tokenizer to use (a local directory or ``"all-MiniLM-L6-v2"``); ``None``
            keeps texts as strings.
        max_length: longest tokenised text.
    """

    def __init__(
        self, batch_size: int = 32, num_workers: int = 0, tokenizer: str | None = "all-MiniLM-L6-v2", max_length: int = 64
    ) -> None:
        super().__init__()
        if batch_size <= 0:
            raise ValueError(f"batch_size={batch_size} must be positive")
        if num_workers < 0:
            raise ValueError(f"num_workers={num_workers} must be >= 0")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.tokenizer_name = tokenizer
        self.max_length = max_length
        self.datasets: dict[str, Dataset] = {}
        self._collate: MultimodalCollate | None = None

    @property
    def class_names(self) -> Sequence[str]:
        """Label names, index = class id."""
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.class_names)

    def has_split(self, split: str) -> bool:
        """Whether ``split`` (``"train"``, ``"val"``, ``"test"``) has samples once ``setup`` has run."""
        dataset = self.datasets.get(split)
        return dataset is not None and len(dataset) > 0

    @property
    def collate(self) -> MultimodalCollate:
        """The batch collate function (tokenizer loaded on first use)."""
        if self._collate is None:
            tokenizer = None if self.tokenizer_name is None else load_tokenizer(self.tokenizer_name)
            self._collate = MultimodalCollate(tokenizer, self.max_length)
        return self._collate

    def _loader(self, split: str, shuffle: bool, sampler: Sampler | None = None) -> DataLoader:
        if split not in self.datasets:
            raise RuntimeError(f"{type(self).__name__} has no {split!r} split; was setup() called for this stage?")
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size,
            shuffle=shuffle,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=self.collate,
            persistent_workers=self.num_workers > 0,
        )

    def evaluation_sampler(self, split: str) -> Sampler | None:
        """Under a distributed Trainer, this process's share of ``split`` without padding; ``None`` otherwise.

        Lightning's ``DistributedSampler`` pads a split to a multiple of the process count, so up to N-1 samples
        would be evaluated twice; Lightning's ``UnrepeatedDistributedSampler`` (what it uses for ``predict``) gives
        the ranks counts that differ by at most one instead, and the metrics sync over uneven counts. Lightning leaves
        a loader that already has a ``DistributedSampler`` as it is. Used by the val and test loaders.

        Raises:
            ValueError: ``split`` has fewer samples than there are processes (a rank without a batch would block
                the others at the end of the epoch).
        """
        trainer = self.trainer
        shares = None if trainer is None else trainer.distributed_sampler_kwargs
        if not shares or shares.get("num_replicas", 1) < 2 or split not in self.datasets:
            return None  # a missing split: the loader names it
        dataset = self.datasets[split]
        size, processes = len(dataset), shares["num_replicas"]
        if 0 < size < processes:
            raise ValueError(
                f"the {split} split has {size} sample(s) for {processes} processes; every process needs at least one: "
                f"run fewer processes or give the {split} split at least {processes} samples"
            )
        return UnrepeatedDistributedSampler(dataset, shuffle=False, **shares)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False, sampler=self.evaluation_sampler("val"))

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False, sampler=self.evaluation_sampler("test"))

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
