"""What ``ml-optim-plugins predict`` adds to LightningCLI's ``predict``, and the command that ``fit`` points at."""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_warn
from rich.console import Console

from ml_optim_plugins.data.base import MultimodalDataModule
from ml_optim_plugins.prediction.checkpoint import check_checkpoint_fits
from ml_optim_plugins.prediction.writer import PredictionWriter


def prepare_predict(trainer: pl.Trainer, data: MultimodalDataModule, ckpt_path: str | None) -> None:
    """Before ``predict``: refuse a checkpoint that does not fit ``data`` (:func:`check_checkpoint_fits`), and add a
    :class:`PredictionWriter` (``predictions.csv`` in the run directory) when the config has no prediction writer."""
    if ckpt_path and Path(ckpt_path).is_file():
        check_checkpoint_fits(ckpt_path, data)
    elif not ckpt_path:
        rank_zero_warn("predicting without --ckpt_path: the recipe's model as initialised, not a trained one")
    if not any(isinstance(callback, BasePredictionWriter) for callback in trainer.callbacks):
        trainer.callbacks.append(PredictionWriter())


def _shown(path: str | Path) -> str:
    """``path`` relative to the working directory when it lies under it, shell-quoted."""
    path = Path(str(path)).resolve()  # str(): jsonargparse's paths (the CLI's -c files) are not os.PathLike
    shown = os.path.relpath(path) if path.is_relative_to(Path.cwd()) else str(path)
    return shlex.quote(shown)


def predict_command(trainer: pl.Trainer, config_files: Sequence[str | Path] = ()) -> str | None:
    """The command that predicts with the checkpoint ``fit`` selected (``None`` without one): the run's saved
    ``config.yaml`` (every override included), else ``config_files``.

    Example:
        >>> from types import SimpleNamespace
        >>> trainer = SimpleNamespace(log_dir=None, checkpoint_callback=SimpleNamespace(best_model_path="best.ckpt"))
        >>> predict_command(trainer, ["recipes/quickstart.yaml"])
        'ml-optim-plugins predict -c recipes/quickstart.yaml --ckpt_path best.ckpt --data.init_args.predict POSTS'
    """
    checkpoint = getattr(trainer.checkpoint_callback, "best_model_path", "")
    if not checkpoint:
        return None
    saved = Path(trainer.log_dir) / "config.yaml" if trainer.log_dir else None
    configs = [saved] if saved is not None and saved.is_file() else list(config_files)
    options = " ".join(f"-c {_shown(config)}" for config in configs) or "-c RECIPE"
    return f"ml-optim-plugins predict {options} --ckpt_path {_shown(checkpoint)} --data.init_args.predict POSTS"


def print_predict_command(trainer: pl.Trainer, config_files: Sequence[str | Path] = ()) -> None:
    """Print :func:`predict_command` after ``fit`` (rank 0), with what ``POSTS`` may be."""
    command = predict_command(trainer, config_files)  # trainer.log_dir is a collective under DDP: every rank asks
    if command is None or not trainer.is_global_zero:
        return
    Console().print(
        "predict with the selected model (POSTS: a CSV / JSONL of image path and text, optionally id; an MVSA root; "
        f"or a folder of <id>.jpg + <id>.txt):\n  {command}",
        soft_wrap=True,
        highlight=False,
    )
