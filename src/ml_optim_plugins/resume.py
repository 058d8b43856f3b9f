"""Exact resume: every training batch draws its random numbers from a seed of its own (:class:`ExactResume`), so a
resumed run draws what an uninterrupted one would, beside the position inside the epoch that a resumable DataLoader
(torchdata's ``StatefulDataLoader``) keeps in the checkpoint."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from ml_optim_plugins.lightning_internals import (
    load_pending_train_loader_state,
    make_resumed_epochs_iterator_after_its_hooks,
    restart_train_iterator,
    resumed_after_an_epochs_last_batch,
    set_train_sampler_epochs,
    train_loaders,
)


def batch_seed(run_seed: int, epoch: int, batch_idx: int) -> int:
    """The 64-bit seed of one training batch: a hash (NumPy's ``SeedSequence``) of the run's seed, the epoch and the
    batch's index in it, so that nearby batches get unrelated streams.

    Example:
        >>> batch_seed(0, 0, 1) == batch_seed(0, 0, 1), batch_seed(0, 0, 1) == batch_seed(0, 1, 0)
        (True, False)
    """
    low, high = np.random.SeedSequence([run_seed, epoch, batch_idx]).generate_state(2)
    return (int(high) << 32 | int(low)) & (2**63 - 1)


def epoch_seed(run_seed: int, epoch: int, stream: int = 0) -> int:
    """The 64-bit seed of one epoch's shuffle, unrelated to every :func:`batch_seed`: ``stream`` 0 for
    :class:`~ml_optim_plugins.data.EpochShuffle`, 1 for the global generators at the epoch's start, 2, 3, ... for each
    generator of the train loaders."""
    low, high = np.random.SeedSequence([run_seed, epoch] + ([stream] if stream else [])).generate_state(2)
    return (int(high) << 32 | int(low)) & (2**63 - 1)


def loader_generators(loaders: Sequence[Any]) -> list[torch.Generator]:
    """The ``torch.Generator`` objects that the given DataLoaders shuffle with (a loader's own ``generator``, its
    sampler's and its batch sampler's sampler's), each once, in order.

    Example:
        >>> from torch.utils.data import DataLoader
        >>> generator = torch.Generator()
        >>> loader_generators([DataLoader(range(4), shuffle=True, generator=generator)]) == [generator]
        True
    """
    found: dict[int, torch.Generator] = {}
    for loader in loaders:
        batch_sampler = getattr(loader, "batch_sampler", None)
        for owner in (loader, getattr(loader, "sampler", None), getattr(batch_sampler, "sampler", None)):
            generator = getattr(owner, "generator", None)
            if isinstance(generator, torch.Generator):
                found.setdefault(id(generator), generator)
    return list(found.values())


def seed_global_generators(seed: int) -> None:
    """Seed torch (CPU and every CUDA device), NumPy's global generator and Python's ``random`` from one seed."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


class ExactResume(Callback):
    """Make a resumed run continue bit for bit: seed the global random generators at every training batch from (run
    seed, epoch, batch index), and keep each process's run seed in checkpoints.

    The run seed is ``torch.initial_seed()`` at fit start; seeding each batch from its own coordinates makes its
    random draws (dropout and Gaussian-dropout noise, anything from the global torch / NumPy / Python generators)
    independent of what ran before the checkpoint. With a resumable loader (the data modules'
    ``StatefulDataLoader`` over :class:`~ml_optim_plugins.data.EpochShuffle`) a run resumed from any checkpoint, mid-epoch
    included, repeats the uninterrupted one; with plain shuffling DataLoaders, from an epoch's end (each epoch's
    order is seeded from the run seed and the epoch); random augmentation inside a dataset does not. docs/recipes.md
    (Resume) says what is exact and why.

    Example::

        trainer = Trainer(callbacks=[ExactResume(), ModelCheckpoint(every_n_train_steps=100, save_top_k=-1)])
        trainer.fit(model, datamodule=data)                                # interrupted after step 250
        trainer.fit(model, datamodule=data, ckpt_path=".../step=200.ckpt")  # steps 201.. as if never stopped
    """

    def __init__(self) -> None:
        self._seed: int | None = None
        self._loaded: list[int] | None = None

    @property
    def state_key(self) -> str:
        return type(self).__name__

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":  # a checkpoint's seeds are loaded after setup; none left over from a fit that failed
            self._loaded = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._seed = torch.initial_seed()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        load_pending_train_loader_state(trainer)  # inside an epoch only: never with a last-batch resume (below)
        if self._loaded is not None:
            seeds, self._loaded = self._loaded, None
            if len(seeds) != trainer.world_size:
                rank_zero_warn(
                    f"ExactResume: the checkpoint holds the seeds of {len(seeds)} process(es), this run has "
                    f"{trainer.world_size}; random draws (dropout noise) will differ from an uninterrupted run"
                )
            self._seed = seeds[trainer.global_rank % len(seeds)]
        if resumed_after_an_epochs_last_batch(trainer):
            # Lightning goes on to the next epoch without its epoch-start hooks, from the iterator made at setup.
            self._seed_epoch(trainer)
            restart_train_iterator(trainer)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._seed_epoch(trainer)
        make_resumed_epochs_iterator_after_its_hooks(trainer)  # as in every other epoch, not the one made at setup

    def _seed_epoch(self, trainer: pl.Trainer) -> None:
        """Draw the coming epoch's order from (run seed, epoch) alone: its iterator is made after this (after the
        epoch-start hooks). The samplers get the epoch that runs (Lightning's is one ahead after a ``max_steps`` run
        resumed at an epoch end); the global generators (a plain ``shuffle=True`` draws from them) and each generator
        of the train loaders are seeded from it."""
        assert self._seed is not None
        epoch = trainer.current_epoch
        set_train_sampler_epochs(trainer, epoch)
        seed_global_generators(epoch_seed(self._seed, epoch, 1))
        for stream, generator in enumerate(loader_generators(train_loaders(trainer)), start=2):
            generator.manual_seed(epoch_seed(self._seed, epoch, stream))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        assert self._seed is not None
        if batch_idx >= trainer.num_training_batches:
            rank_zero_warn(
                f"ExactResume: Lightning runs a training batch past the end of epoch {trainer.current_epoch} (batch "
                f"{batch_idx} of {trainer.num_training_batches}), as it does when a max_steps run resumes from a "
                "checkpoint saved at a training epoch's end without validation (Lightning issue #19403): the resumed "
                "run is one optimizer step off the uninterrupted one. Resume from a checkpoint saved after validation, "
                "or inside an epoch (ModelCheckpoint(every_n_train_steps=...)) with a resumable loader (torchdata's "
                "StatefulDataLoader), or train with max_epochs."
            )
        seed_global_generators(batch_seed(self._seed, trainer.current_epoch, batch_idx))

    def state_dict(self) -> dict[str, Any]:
        # Called on every rank while a checkpoint is written (ModelCheckpoint saves on all ranks at the same step).
        seeds = [self._seed]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            seeds = [None] * dist.get_world_size()
            dist.all_gather_object(seeds, self._seed)
        return {"seeds": seeds}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = list(state_dict["seeds"])
