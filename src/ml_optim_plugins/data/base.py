"""Common LightningDataModule for image + text classification data."""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
from torch.utils.data import DataLoader, Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

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

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            raise RuntimeError(f"{type(self).__name__} has no {split!r} split; was setup() called for this stage?")
        # Resumable: Lightning keeps the loader's state (shuffle generator, batches already served) in checkpoints, so
        # a run resumed mid-epoch continues with the next batch (ExactResume restores the global random states).
        return StatefulDataLoader(
            self.datasets[split],
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=self.collate,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
