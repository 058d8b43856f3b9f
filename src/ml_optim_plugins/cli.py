"""Command line: ``ml-optim-plugins fit|validate|test|predict -c recipes/NAME.yaml``, built on LightningCLI."""

from __future__ import annotations

import os
from pathlib import Path

from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from rich.console import Console
from rich.table import Table

from ml_optim_plugins.data.base import MultimodalDataModule
from ml_optim_plugins.multimodal.classifier import MultimodalClassifier


class MultimodalCLI(LightningCLI):
    """LightningCLI for :class:`MultimodalClassifier` (or a subclass) and any :class:`MultimodalDataModule`.

    ``data.num_classes`` is linked to ``model.num_classes``. After ``fit`` / ``validate`` / ``test`` it prints the final
    metrics, the log directory and the best checkpoint.

    Example:
        >>> MultimodalCLI(args=["fit", "-c", "recipes/quickstart.yaml"])  # doctest: +SKIP
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.init_args.class_names", apply_on="instantiate")

    def instantiate_trainer(self, **kwargs):  # noqa: D102 - LightningCLI hook
        trainer = super().instantiate_trainer(**kwargs)
        align_logger_versions(trainer)
        return trainer

    def after_fit(self) -> None:
        print_run_summary(self.trainer, "fit")

    def after_validate(self) -> None:
        print_run_summary(self.trainer, "validate")

    def after_test(self) -> None:
        print_run_summary(self.trainer, "test")


def print_run_summary(trainer: Trainer, stage: str) -> None:
    """Print the final epoch metrics, the log directory and the best checkpoint (rank 0 only)."""
    log_dir = trainer.log_dir  # a collective under DDP: every rank must ask
    if not trainer.is_global_zero:
        return
    table = Table(title=f"ml-optim-plugins {stage}: final metrics")
    table.add_column("metric")
    table.add_column("value", justify="right")
    final = {
        name.removesuffix("_epoch"): float(value)
        for name, value in trainer.callback_metrics.items()
        if "/" in name and not name.endswith("_step")
    }
    for name, value in sorted(final.items()):
        table.add_row(name, f"{value:.4f}")
    console = Console()
    console.print(table)
    if log_dir:
        console.print(f"logs (CSV, TensorBoard, config): {Path(log_dir).resolve()}")
    checkpoint = getattr(trainer.checkpoint_callback, "best_model_path", "")
    if checkpoint:
        score = trainer.checkpoint_callback.best_model_score
        shown = "" if score is None else f" ({trainer.checkpoint_callback.monitor} = {float(score):.4f})"
        console.print(f"best checkpoint{shown}: {Path(checkpoint).resolve()}")


def align_logger_versions(trainer: Trainer) -> None:
    """Make loggers that write under the same ``save_dir/name`` share the first one's version folder.

    Each of Lightning's file loggers picks ``version_N`` on its own, so a CSV and a TensorBoard logger of one run land
    in different folders; this puts one run's metrics, events, config and checkpoints in one directory.
    """
    if len(trainer.loggers) < 2:
        return
    first = trainer.loggers[0]
    for logger in trainer.loggers[1:]:
        same_place = (logger.save_dir, logger.name) == (first.save_dir, first.name)
        if same_place and getattr(logger, "_version", 0) is None:
            logger._version = first.version


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``ml-optim-plugins`` console script."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run(args)


def run(args: list[str] | None = None) -> MultimodalCLI:
    """Run the CLI on ``args`` (default: ``sys.argv``) and return it, for scripts and tests."""
    return MultimodalCLI(
        MultimodalClassifier,
        MultimodalDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
