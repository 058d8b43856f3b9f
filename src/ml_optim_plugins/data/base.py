"""Common LightningDataModule for image + text classification data."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

from ml_optim_plugins.data.collate import MultimodalCollate, load_tokenizer
from ml_optim_plugins.data.predict_inputs import check_predict_inputs, read_predict_inputs
from ml_optim_plugins.data.preprocessing import describe_preprocessing
from ml_optim_plugins.data.rows import ManifestDataset, ManifestError
from ml_optim_plugins.data.transforms import image_transform
from ml_optim_plugins.rank_seed import run_seed
from ml_optim_plugins.resume import epoch_seed


class EpochShuffle(DistributedSampler):
    """A random order of ``range(size)`` for each epoch that depends on ``(seed, epoch)`` alone; under DDP, each
    process's share of it.

    Lightning calls ``set_epoch`` before each training epoch. Because an epoch's order is a pure function of the seed
    and the epoch, never of a generator's history, a run resumed from any checkpoint (an epoch's end included)
    shuffles each epoch as the uninterrupted run did, and a resumable loader finds its place in the epoch by replaying
    its order. With ``num_replicas`` processes, the order is padded to a multiple of them with its first samples and
    process ``rank`` takes every ``num_replicas``-th sample from position ``rank``, as ``DistributedSampler`` does, so
    one process with batches of ``N * b`` sees the same global batches as ``N`` processes with batches of ``b``. A
    ``DistributedSampler`` itself, so Lightning leaves it in place under DDP instead of rebuilding the loader. Its
    epoch and place travel in the loader's state (``state_dict``), so a loader restored from a checkpoint serves the
    right epoch even when it draws indices before Lightning's ``set_epoch`` (as one with worker processes does).

    Args:
        size: the number of samples.
        seed: the run's seed, the same in every process (the data modules pass
            :func:`~ml_optim_plugins.rank_seed.run_seed`, i.e. ``seed_everything``'s).
        num_replicas: the number of processes sharing the epoch.
        rank: this process's rank among them.

    Example:
        >>> sampler = EpochShuffle(5, seed=0)
        >>> first = list(sampler)
        >>> sorted(first), list(sampler) == first
        ([0, 1, 2, 3, 4], True)
        >>> sampler.set_epoch(1)
        >>> list(sampler) != first, list(EpochShuffle(5, seed=0)) == first
        (True, True)
        >>> shares = [list(EpochShuffle(5, seed=0, num_replicas=2, rank=rank)) for rank in (0, 1)]
        >>> shares[0] + shares[1] == first[0::2] + first[1::2] + first[:1]  # padded with the first sample
        True
    """

    def __init__(self, size: int, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(range(size), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.size = size
        self._served = 0  # samples the current iterator has handed out
        self._resume: tuple[int, int] | None = None  # (epoch, samples served) of a loaded state

    def __iter__(self) -> Iterator[int]:
        # A generator function: the order is drawn at the first sample, not when the iterator is made. A resumable
        # loader can make its iterator before Lightning's set_epoch (torchdata's, when asked for its state first).
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        order = torch.randperm(self.size, generator=generator).tolist()
        repeats = -(-self.total_size // max(self.size, 1))  # padded with its first samples, as DistributedSampler is
        resume, self._resume = self._resume, None
        self._served = resume[1] if resume is not None and resume[0] == self.epoch else 0
        for index in (order * repeats)[self.rank : self.total_size : self.num_replicas][self._served :]:
            self._served += 1
            yield index

    def state_dict(self) -> dict[str, int]:
        """The epoch and the samples served of it (torchdata's ``StatefulDataLoader`` keeps this in its state, taken
        as each batch's indices are drawn, so Lightning's checkpoints hold it). An epoch served to its end is saved as
        the next epoch, not yet begun: that is where a resumed loader continues."""
        if self._served >= self.num_samples:
            return {"epoch": self.epoch + 1, "served": 0}
        return {"epoch": self.epoch, "served": self._served}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Continue at a saved place: the next iterator serves the saved epoch's order from the sample after the last
        one served. Set here, before the loader draws any index: with worker processes, a resumed loader draws its
        first batches' indices when it is made, before Lightning's ``set_epoch`` (which then leaves the place as it
        is when it names the same epoch, and starts the epoch it names from its beginning otherwise)."""
        self.epoch = int(state_dict["epoch"])
        self._resume = (self.epoch, int(state_dict["served"]))


class MultimodalDataModule(pl.LightningDataModule):
    """Base of the library's data modules: batches of ``{"image", "text", "label", "index"}`` with texts tokenised
    (``index``: each sample's position in its split, the sample id of feature caches and of predictions).

    Subclasses fill ``self.datasets`` (``"train"``, ``"val"``, ``"test"``) in ``setup``, then call ``super().setup``,
    and define :attr:`class_names` and :attr:`image_config`. ``num_classes``, ``class_names`` and
    :attr:`preprocessing` are known as soon as the data module is built, so LightningCLI links them to the model
    (the last two are saved in its checkpoints).

    ``predict`` names new, unlabelled inputs (:func:`~ml_optim_plugins.data.predict_inputs.read_predict_inputs`: a
    CSV / TSV / JSONL manifest of image path, text and optionally id; an MVSA root; or a folder of ``<id>.jpg`` +
    ``<id>.txt``). ``setup("predict")`` reads and checks them as training rows are checked (a bad row raises
    :class:`~ml_optim_plugins.data.ManifestError` with file and line, or is skipped and counted with
    ``on_bad_rows="skip"``), and ``predict_dataloader`` serves them in input order, prepared like the evaluation
    splits (:attr:`image_config`).

    Args:
        batch_size: samples per batch (per process under DDP).
        num_workers: DataLoader worker processes.
        tokenizer: the text model whose tokenizer to use (a local directory or ``"all-MiniLM-L6-v2"``); ``None``
            keeps texts as strings.
        max_length: longest tokenised text.
        predict: the inputs to predict on (a manifest file or a folder); ``None``: none, ``predict`` is refused.
        on_bad_rows: ``"raise"`` or ``"skip"``: what a bad row does.
    """

    #: timm data config of the evaluation image transform (``input_size``, ``interpolation``, ``mean``, ``std``,
    #: ``crop_pct``, ``crop_mode``); image files to predict on are prepared with it. ``None``: no image files.
    image_config: dict[str, Any] | None = None

    def __init__(
        self,
        batch_size: int = 32,
        num_workers: int = 0,
        tokenizer: str | None = "all-MiniLM-L6-v2",
        max_length: int = 64,
        predict: str | None = None,
        on_bad_rows: Literal["raise", "skip"] = "raise",
    ) -> None:
        super().__init__()
        if batch_size <= 0:
            raise ValueError(f"batch_size={batch_size} must be positive")
        if num_workers < 0:
            raise ValueError(f"num_workers={num_workers} must be >= 0")
        if on_bad_rows not in ("raise", "skip"):
            raise ValueError(f"on_bad_rows={on_bad_rows!r}; expected 'raise' or 'skip'")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.tokenizer_name = tokenizer
        self.max_length = max_length
        self.predict_inputs = predict
        self.on_bad_rows = on_bad_rows
        #: ``(file, line, problem)`` of the inputs to predict on that ``on_bad_rows="skip"`` left out.
        self.skipped_predict_rows: list[tuple[str, int, str]] = []
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

    @property
    def preprocessing(self) -> dict[str, Any]:
        """How this data prepares samples for the model, as plain data
        (:func:`~ml_optim_plugins.data.preprocessing.describe_preprocessing`): the image transform's config, the
        tokenizer and ``max_length``. Saved in the model's checkpoint, it lets the checkpoint alone prepare new inputs
        (:class:`~ml_optim_plugins.Predictor`)."""
        return describe_preprocessing(self.image_config, self.tokenizer_name, self.max_length)

    def predict_transform(self) -> Callable[..., Any]:
        """The transform of image files to predict on: the evaluation transform of :attr:`image_config`."""
        if self.image_config is None:
            raise NotImplementedError(
                f"{type(self).__name__} has no image_config, so it cannot prepare image files to predict on; set "
                "self.image_config to the timm data config of its evaluation images"
            )
        return image_transform(self.image_config, train=False)

    def handle_bad_rows(self, problems: Sequence[tuple[str, int, str]], attribute: str) -> list[tuple[str, int, str]]:
        """Raise :class:`~ml_optim_plugins.data.ManifestError` listing ``problems`` (``on_bad_rows="raise"``), or warn with
        their count and the first and return them, to be kept in ``attribute`` (``"skip"``)."""
        problems = list(problems)
        if problems and self.on_bad_rows == "raise":
            raise ManifestError(problems)
        if problems:
            rank_zero_warn(
                f"{type(self).__name__} skipped {len(problems)} bad row(s); see .{attribute}. First: {problems[0]}"
            )
        return problems

    def setup(self, stage: str) -> None:
        """At ``predict``: read and check the inputs of ``predict`` into the ``"predict"`` split."""
        if stage != "predict":
            return
        if self.predict_inputs is None:
            raise ValueError(
                f"{type(self).__name__} has no inputs to predict on; pass predict=PATH (ml-optim-plugins predict ... "
                "--data.init_args.predict PATH): a CSV / TSV / JSONL manifest of image path and text (optionally id), "
                "an MVSA root, or a folder of <id>.jpg + <id>.txt"
            )
        image_column, text_column = self.input_columns
        rows, problems = check_predict_inputs(read_predict_inputs(self.predict_inputs, image_column, text_column))
        self.skipped_predict_rows = self.handle_bad_rows(problems, "skipped_predict_rows")
        if not rows:
            raise ValueError(f"no usable inputs to predict on in {self.predict_inputs!r}")
        self.datasets["predict"] = ManifestDataset(rows, None, self.predict_transform())

    @property
    def input_columns(self) -> tuple[str, str]:
        """The image and text columns of a manifest to predict on."""
        return "image", "text"

    def has_split(self, split: str) -> bool:
        """Whether ``split`` (``"train"``, ``"val"``, ``"test"``, ``"predict"``) has samples once ``setup`` has run."""
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
        # Training is resumable: Lightning keeps the loader's state (batches already served) in checkpoints, so a run
        # resumed mid-epoch continues with the next batch (see ExactResume for the noise). Each epoch's order comes
        # from (run seed, epoch) alone, the same after a resume from any checkpoint; under DDP each process takes its
        # share of it (an EpochShuffle is a DistributedSampler, so Lightning keeps it and the loader as they are).
        loader = StatefulDataLoader if split == "train" else DataLoader
        if shuffle:
            shares = {} if self.trainer is None else self.trainer.distributed_sampler_kwargs or {}
            shares = {key: shares[key] for key in ("num_replicas", "rank") if key in shares}
            seed = run_seed()
            if shares.get("num_replicas", 1) > 1:
                # Rank 0's: without seed_everything (or with a random seed per process) each process has its own,
                # and their shares of differently shuffled epochs would overlap. Every rank builds this loader.
                seed = self.trainer.strategy.broadcast(seed, src=0)
            sampler, shuffle = EpochShuffle(len(self.datasets[split]), seed, **shares), False
        return loader(
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
        """The inputs of ``predict``, in input order (under DDP Lightning shares them out without repeats)."""
        return self._loader("predict", shuffle=False)
