"""The one place that reaches into Lightning's and torch's private attributes, each where they have no public way yet.

Every function names the attribute it uses, why, and the versions it was checked on (Lightning 2.6.6, torch 2.14).
When an attribute disappears the function degrades to what Lightning does without it (and says so by its return
value), and its test in ``tests/test_lightning_internals.py`` fails loudly. No other module of the package may use a
private name of Lightning or torch: ``tests/test_lightning_internals.py`` scans the source for them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl

try:
    from lightning.fabric.utilities.data import _set_sampler_epoch
except ImportError:  # gone from Lightning: the pending-state workaround leaves the samplers' epoch to Lightning
    _set_sampler_epoch = None


def load_pending_train_loader_state(trainer: pl.Trainer) -> bool:
    """Load the train dataloaders' saved state if Lightning skipped it, and restart the batch iterator from it.

    Lightning restores a resumable (``state_dict`` / ``load_state_dict``) train loader in ``FitLoop.setup_data``; when
    something reads ``trainer.estimated_stepping_batches`` before the checkpoint is restored (a callback's
    ``on_fit_start``, or ``configure_optimizers``), the loader is set up early, the saved state is stashed afterwards
    and never loaded, and a resumed run starts its epoch from the first batch again (Lightning issue #20550, open in
    2.6.6). Inside an epoch, the iterator made in that early setup would serve the rest of it, and with worker
    processes it has drawn its first indices from the samplers' epoch 0: the samplers get the epoch that runs and a new
    iterator is made from the loaded state. At an epoch's end the saved state is dropped (the next epoch starts afresh;
    :func:`make_resumed_epochs_iterator_after_its_hooks` has its iterator made at its start; after a checkpoint of an
    epoch's last batch, the caller restarts it: :func:`resumed_after_an_epochs_last_batch`). Called from
    ``on_train_start``, before the first batch is drawn.

    Uses ``FitLoop._combined_loader_states_to_load``, ``FitLoop._load_combined_loader_states()``,
    ``FitLoop._data_fetcher``, ``FitLoop._combined_loader``, ``FitLoop.restarted_mid_epoch`` and
    ``lightning.fabric.utilities.data._set_sampler_epoch`` (Lightning 2.6.6).

    Returns:
        Whether a pending state was loaded.
    """
    fit_loop = trainer.fit_loop
    if not getattr(fit_loop, "_combined_loader_states_to_load", None):
        return False
    if not fit_loop.restarted_mid_epoch or resumed_after_an_epochs_last_batch(trainer):
        # Resumed at an epoch's end, or at its last batch (Lightning goes on to the next epoch): the saved state is
        # that of a finished epoch, whose exhausted iterator would serve the next one no batch; it starts afresh.
        fit_loop._combined_loader_states_to_load = []
        return False
    fit_loop._load_combined_loader_states()
    set_train_sampler_epochs(trainer, trainer.current_epoch)  # Lightning sets it only later (on_advance_start)
    restart_train_iterator(trainer)
    return True


def train_loaders(trainer: pl.Trainer) -> list[Any]:
    """The fit's train dataloaders, each one (the iterables of a ``CombinedLoader``, flattened); empty before they are
    set up. Uses ``FitLoop._combined_loader`` (Lightning 2.6.6)."""
    combined = getattr(trainer.fit_loop, "_combined_loader", None)
    return [] if combined is None else list(combined.flattened)


def set_train_sampler_epochs(trainer: pl.Trainer, epoch: int) -> bool:
    """Give every train loader's sampler (and batch sampler) with ``set_epoch`` the epoch ``epoch``.

    Lightning sets it at each epoch's start from ``FitLoop.epoch_progress.current.processed``, which after an
    iteration-based run (``max_steps``) resumed from an epoch-end checkpoint is one ahead of ``current_epoch``, so each
    epoch would be shuffled as the next one (Lightning 2.6.6). Uses
    ``lightning.fabric.utilities.data._set_sampler_epoch``.

    Returns:
        Whether the loaders were reached (False before the train loader is set up, or when the helper is gone).
    """
    loaders = train_loaders(trainer)
    if not loaders or _set_sampler_epoch is None:
        return False
    for loader in loaders:
        _set_sampler_epoch(loader, epoch)
    return True


def make_resumed_epochs_iterator_after_its_hooks(trainer: pl.Trainer) -> bool:
    """At the start of a resumed run's first epoch, let Lightning make that epoch's train iterator as it does for
    every later epoch: after all ``on_train_epoch_start`` hooks (and so from the samplers' epoch and generators as the
    hooks left them), instead of serving the epoch from the iterator it made at setup, before the checkpoint was
    restored.

    Lightning makes a new iterator at an epoch's start unless the fit is resuming or the epoch loop restarts
    mid-epoch (``_TrainingEpochLoop.on_run_start``); this clears ``FitLoop._resuming_from_checkpoint`` (which Lightning
    clears itself after that epoch) when the epoch loop is not restarting (Lightning 2.6.6).

    Returns:
        Whether Lightning will now make the iterator.
    """
    fit_loop = trainer.fit_loop
    if trainer.current_epoch == 0 or not fit_loop.is_resuming or fit_loop.epoch_loop.restarting:
        return False
    if not hasattr(fit_loop, "_resuming_from_checkpoint"):
        return False
    fit_loop._resuming_from_checkpoint = False
    return True


def restart_train_iterator(trainer: pl.Trainer) -> bool:
    """Make the train loader's batch iterator anew now (``FitLoop._data_fetcher``, Lightning 2.6.6).

    Returns:
        Whether there was a fetcher to restart.
    """
    fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)
    if fetcher is None:
        return False
    iter(fetcher)
    return True


def resumed_mid_epoch(trainer: pl.Trainer) -> bool:
    """Whether the fit resumed from a checkpoint saved inside a training epoch (``FitLoop.restarted_mid_epoch``,
    Lightning 2.6.6; meaningful from ``on_train_start`` until the first resumed batch)."""
    return bool(getattr(trainer.fit_loop, "restarted_mid_epoch", False))


def resumed_after_an_epochs_last_batch(trainer: pl.Trainer) -> bool:
    """Whether the fit resumed from a checkpoint saved at the end of an epoch's last training batch
    (``every_n_train_steps`` dividing the epoch). Lightning resumes it as a mid-epoch restart that counts the epoch
    done and goes on to the next epoch without its ``on_train_epoch_start`` hooks and with the iterator made at setup.
    A checkpoint saved after the validation that follows the last batch (``on_validation_end``) is not one: Lightning
    finishes that epoch and starts the next with its hooks. Uses ``FitLoop.restarted_mid_epoch``,
    ``_TrainingEpochLoop.restarted_on_train_batch_end`` and ``_TrainingEpochLoop.batch_progress.is_last_batch`` (the
    condition of ``FitLoop.reset``, Lightning 2.6.6); meaningful at ``on_train_start``."""
    epoch_loop = trainer.fit_loop.epoch_loop
    progress = getattr(epoch_loop, "batch_progress", None)
    return (
        resumed_mid_epoch(trainer)
        and bool(getattr(epoch_loop, "restarted_on_train_batch_end", False))
        and bool(getattr(progress, "is_last_batch", False))
    )


def logging_step(trainer: pl.Trainer) -> int:
    """The ``step`` that loggers receive for the next training batch: the count of batches that stepped an optimizer.

    Lightning logs with ``FitLoop.epoch_loop._batches_that_stepped`` (not ``global_step``, which counts the steps of
    every optimizer, several per batch under manual optimization), and so do its own ``LearningRateMonitor`` and
    ``DeviceStatsMonitor``; after a restore it accounts for where the checkpoint was saved from the first training
    batch on. Falls back to ``trainer.global_step`` (equal with one optimizer under automatic optimization) if the
    attribute is gone. Lightning 2.6.6.
    """
    return int(getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step))


def logger_version_unset(logger: Any) -> bool:
    """Whether a file logger (``CSVLogger``, ``TensorBoardLogger``) was built without a ``version`` and has not picked
    its ``version_N`` yet (it picks the next free one the first time ``logger.version`` is read).

    Reading the public ``logger.version`` would pick it. Uses ``_version`` of ``lightning.fabric``'s ``CSVLogger``
    and ``TensorBoardLogger`` (which ``lightning.pytorch``'s loggers extend), None until picked (Lightning 2.6.6).
    False for a logger without that attribute.
    """
    return hasattr(logger, "_version") and logger._version is None


def set_logger_version(logger: Any, version: int | str) -> bool:
    """Make a file logger (``CSVLogger``, ``TensorBoardLogger``) that is already built write under ``version``
    (``version_N`` for an int), as if it had been built with ``version=version``.

    Lightning's loggers take a version only as a constructor argument; LightningCLI builds them from the config before
    the library knows the run directory (resuming from a checkpoint in it) or the version another logger picked. Call
    it before the logger writes anything. Uses ``_version`` (see :func:`logger_version_unset`; Lightning 2.6.6).

    Returns:
        Whether the version was set (False: the logger has no ``_version``, and keeps its own).
    """
    if not hasattr(logger, "_version"):
        return False
    logger._version = version
    return True


def prepend_csv_rows(writer: Any, rows: Sequence[Mapping[str, Any]]) -> bool:
    """Put ``rows`` (column -> value, ``step`` included) before the rows a ``CSVLogger``'s writer (its
    ``experiment``) has received and not yet written, so they come first in its ``metrics.csv``.

    The writer keeps the rows that ``log_metrics`` hands it in a list and writes them at ``save()``; its only public
    way in is ``log_metrics``, which appends, after rows other callbacks may have logged in the same hook. Uses
    ``metrics``, the pending rows of ``lightning.fabric.loggers.csv_logs._ExperimentWriter`` (Lightning 2.6.6).

    Returns:
        Whether the rows were put in (False: the writer keeps no such list; they are dropped, as Lightning drops the
        old ``metrics.csv``).
    """
    pending = getattr(writer, "metrics", None)
    if not isinstance(pending, list):
        return False
    writer.metrics = [dict(row) for row in rows] + pending
    return True


def optimizer_unscales_in_step(optimizer: Any) -> bool:
    """Whether ``optimizer`` unscales AMP's loss scale inside its own ``step`` (fused Adam / AdamW / SGD).

    For such an optimizer neither torch's ``GradScaler.step`` nor Lightning's ``MixedPrecision`` plugin calls
    ``scaler.unscale_`` first, so under ``16-mixed`` the gradients that ``on_before_optimizer_step`` sees still carry
    the loss scale. Uses the optimizer's ``_step_supports_amp_scaling`` (torch 2.14), which torch's ``GradScaler`` and
    Lightning's ``_optimizer_handles_unscaling`` (Lightning 2.6.6) read the same way. False when absent.
    """
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


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
