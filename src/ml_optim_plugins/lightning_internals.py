"""The one place that reaches into Lightning's private attributes, each where Lightning has no public way yet.

Every function names the attribute it uses, why, and the Lightning versions it was checked on (2.6.6). When an
attribute disappears the function degrades to doing nothing, and the test that covers it fails loudly.
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.fabric.utilities.data import _set_sampler_epoch


def load_pending_train_loader_state(trainer: pl.Trainer) -> bool:
    """Load the train dataloaders' saved state if Lightning skipped it, and restart the batch iterator from it.

    Lightning restores a resumable (``state_dict`` / ``load_state_dict``) train loader in ``FitLoop.setup_data``; when
    something reads ``trainer.estimated_stepping_batches`` before the checkpoint is restored (a callback's
    ``on_fit_start``, or ``configure_optimizers``), the loader is set up early, the saved state is stashed afterwards
    and never loaded, and a resumed run starts its epoch from the first batch again (Lightning issue #20550, open in
    2.6.6). Called from ``on_train_start``, before the first batch is drawn.

    Uses ``FitLoop._combined_loader_states_to_load``, ``FitLoop._load_combined_loader_states()``,
    ``FitLoop._data_fetcher``, ``FitLoop._combined_loader``, ``FitLoop.restarted_mid_epoch`` and
    ``lightning.fabric.utilities.data._set_sampler_epoch`` (Lightning 2.6.6).

    Returns:
        Whether a pending state was loaded.
    """
    fit_loop = trainer.fit_loop
    if not getattr(fit_loop, "_combined_loader_states_to_load", None):
        return False
    if not fit_loop.restarted_mid_epoch:
        # Resumed at an epoch's end: the saved state is that of a finished epoch, and the next epoch's iterator, which
        # Lightning creates after on_train_epoch_start, shuffles from the generator ExactResume seeds for that epoch.
        fit_loop._combined_loader_states_to_load = []
        return False
    fit_loop._load_combined_loader_states()
    fetcher = getattr(fit_loop, "_data_fetcher", None)
    if fetcher is not None:
        # Lightning sets the samplers' epoch only later (FitLoop.on_advance_start), and the new iterator prefetches a
        # batch now: an epoch-seeded sampler (EpochShuffle, DistributedSampler) must know its epoch first.
        for loader in fit_loop._combined_loader.flattened:
            _set_sampler_epoch(loader, trainer.current_epoch)
        iter(fetcher)  # a new iterator, which starts where the loaded state says (the old one had prefetched a batch)
    return True


def logging_step(trainer: pl.Trainer) -> int:
    """The ``step`` that loggers receive for the next training batch: the count of batches that stepped an optimizer.

    Lightning logs with ``FitLoop.epoch_loop._batches_that_stepped`` (not ``global_step``, which counts the steps of
    every optimizer); after a restore it already accounts for where the checkpoint was saved. Lightning 2.6.6.
    """
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)


def val_dataloader_defined(trainer: pl.Trainer) -> bool:
    """Whether this fit has a validation dataloader to draw from, asked at ``on_fit_start``, before Lightning loads it.

    Until the validation loop sets up its data (after ``on_fit_start``; ``trainer.val_dataloaders`` is ``None`` until
    then, and stays so in a first epoch that does not validate), the only record of ``fit(val_dataloaders=...)`` or
    of a ``val_dataloader()`` method is the loop's data source. A callback that needs validation (a stage that starts
    on a validation metric) asks here, so a run without validation data fails before its first step.

    Uses ``_EvaluationLoop._data_source`` (a ``_DataLoaderSource``) and its ``is_defined()`` (Lightning 2.6.6). If the
    attribute is missing, returns ``True`` (assume validation runs).
    """
    source = getattr(getattr(trainer.fit_loop.epoch_loop, "val_loop", None), "_data_source", None)
    return source is None or bool(source.is_defined())
