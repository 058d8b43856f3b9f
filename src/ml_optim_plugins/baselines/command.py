"""The ``ml-optim-plugins baselines -c RECIPE`` command: builds the recipe's model and data with the recipe CLI, fits
the baselines on the frozen encoders' features and scores the recipe's trained checkpoint beside them."""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer
from rich.console import Console
from torch import nn
from torch.utils.data import DataLoader

from ml_optim_plugins.baselines.core import METRICS, BaselineResult, extract_features, fit_baselines
from ml_optim_plugins.baselines.report import BaselineReport, baselines_table, split_sizes, write_report
from ml_optim_plugins.data.base import MultimodalDataModule
from ml_optim_plugins.multimodal.classifier import MultimodalClassifier


def run_baselines(args: Sequence[str], console: Console | None = None) -> BaselineReport:
    """``ml-optim-plugins baselines``: baselines on the recipe's frozen pretrained features, beside its trained model.

    ``args`` are what ``fit`` takes (``-c RECIPE``, ``--model...``, ``--data...``, ``--trainer...`` overrides), plus
    ``--ckpt_path PATH`` (default: the newest ``best-*.ckpt`` under the first logger's
    ``save_dir/name/version_*/checkpoints/``) and ``--output_dir DIR`` (default: that checkpoint's run directory, else
    the first logger's ``save_dir/name``, else the current directory). The model and data are built as the recipe
    builds them; :func:`extract_features` takes the features of every split from its encoders as configured
    (pretrained, never finetuned here), :func:`fit_baselines` fits the baselines, and the checkpoint is scored with the
    recipe's Trainer (without its callbacks and loggers, on full splits). Prints the table, writes ``baselines.md``
    and ``baselines.json``.

    Args:
        args: the command line after ``baselines``.
        console: where to print (default: stdout, at least 200 columns wide when it is not a terminal).

    Returns:
        The rows and where they were written.

    Raises:
        SystemExit: on a bad recipe or override (LightningCLI names the key).
        FileNotFoundError: if ``--ckpt_path`` does not exist.
        ValueError: if the Trainer spans several processes, the data has no train or val split, or the checkpoint was
            trained on other data than the recipe (and overrides) given here describe.

    Example:
        >>> report = run_baselines(["-c", "recipes/quickstart.yaml"])  # doctest: +SKIP
        >>> [(r.features, r.method) for r in report.results][-1]  # doctest: +SKIP
        ('image+text', 'trained model')
    """
    from ml_optim_plugins.recipe_cli import MultimodalCLI  # jsonargparse and the CLI load when the command runs

    parser = argparse.ArgumentParser(prog="ml-optim-plugins baselines", add_help=False, allow_abbrev=False)
    parser.add_argument("--ckpt_path", type=Path)
    parser.add_argument("--output_dir", type=Path)
    options, cli_args = parser.parse_known_args(list(args))
    if options.ckpt_path is not None and not options.ckpt_path.is_file():
        raise FileNotFoundError(f"--ckpt_path {options.ckpt_path} is not a file; give a checkpoint written by fit")
    if console is None:
        console = Console()
        console = console if console.is_terminal else Console(width=max(console.width, 200))
    if any(arg in ("-h", "--help") for arg in cli_args):
        console.print("ml-optim-plugins baselines [fit's options] [--ckpt_path PATH] [--output_dir DIR]", markup=False)
    with _quiet_lightning():
        cli = MultimodalCLI(
            MultimodalClassifier,
            MultimodalDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            run=False,
            args=cli_args,
            save_config_callback=None,
        )
        trainer, model, data = cli.trainer, cli.model, cli.datamodule
        if trainer.world_size > 1:
            raise ValueError(
                f"the recipe's Trainer spans {trainer.world_size} processes; baselines run in one: add "
                "--trainer.devices 1 --trainer.num_nodes 1"
            )
        runs = _logger_root(trainer)
        checkpoint = options.ckpt_path or _newest_best_checkpoint(runs)
        if checkpoint is not None:  # before the features: a mismatch would make the whole table meaningless
            _check_same_data(checkpoint, data)
        samples = _setup_splits(data)
        model.to(trainer.strategy.root_device)
        features = {}
        for split, size in samples.items():
            console.print(f"features of {split} ({size} samples) from the frozen encoders ...", markup=False)
            features[split] = extract_features(model, _in_order(data, split))
        console.print("fitting kNN and elastic-net, hyperparameters chosen on validation ...", markup=False)
        seed = cli.config.get("seed_everything")
        results = fit_baselines(
            features["train"], features["val"], features.get("test"), seed=seed if type(seed) is int else 0
        )
        if checkpoint is not None:  # last: loading the checkpoint replaces the pretrained encoders' weights
            results.append(_score_checkpoint(trainer, model, data, checkpoint, "test" in samples))
    if checkpoint is None:
        where = f"under {runs}/version_*/checkpoints/" if runs else "(the recipe has no logger)"
        console.print(
            f"no trained model in the table: no best-*.ckpt {where}; train it with `ml-optim-plugins fit "
            f"{' '.join(cli_args)}` or pass --ckpt_path PATH",
            markup=False,
        )
    output_dir = options.output_dir or (_run_directory(checkpoint) if checkpoint else runs) or Path.cwd()
    report = write_report(results, checkpoint, samples, output_dir)
    console.print(baselines_table(results, title=f"baselines on frozen features ({split_sizes(samples)})"))
    console.print("hyperparameters chosen on validation macro-F1; test is only scored", markup=False)
    console.print(f"written: {report.markdown_path.resolve()} and {report.json_path.name}", markup=False)
    return report


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Hide Lightning's INFO lines (devices, seed, checkpoint restore) and the warnings this command causes on
    purpose (few loader workers, args beside argv, a checkpoint scored without its callbacks), and Lightning's
    pytree deprecation, for the block."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        # `ml-optim-plugins baselines ...` hands LightningCLI the args after `baselines` on purpose.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        # The checkpoint is scored without the recipe's callbacks on purpose (see _score_checkpoint).
        warnings.filterwarnings("ignore", message="Be aware that when using `ckpt_path`, callbacks used to create")
        # Lightning 2.6 on recent torch, on every validate/test: not actionable here.
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
        for logger in loggers:
            logger.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


def _logger_root(trainer: Trainer) -> Path | None:
    """``save_dir/name`` of the Trainer's first logger (where its ``version_N`` run directories go)."""
    save_dir = getattr(trainer.loggers[0], "save_dir", None) if trainer.loggers else None
    return None if save_dir is None else Path(save_dir) / (trainer.loggers[0].name or "")


def _newest_best_checkpoint(runs: Path | None) -> Path | None:
    """The most recently written ``version_*/checkpoints/best-*.ckpt`` under ``runs``."""
    found = list(runs.glob("version_*/checkpoints/best-*.ckpt")) if runs else []
    return max(found, key=lambda path: (path.stat().st_mtime, str(path))) if found else None


# Data arguments that change how batches are loaded, not which samples or labels the splits hold.
_LOADER_ONLY = frozenset({"batch_size", "num_workers", "pin_memory", "persistent_workers", "prefetch_factor"})


def _check_same_data(checkpoint: Path, data: MultimodalDataModule) -> None:
    """Refuse to score a checkpoint whose data module was built with other arguments (root, seeds, sizes, noise ...)
    than ``data``: its "trained model" row would be measured on different samples from the baselines' rows."""
    stored = torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=True).get(
        type(data).CHECKPOINT_HYPER_PARAMS_KEY
    )
    current = dict(data.hparams)
    if stored is None or not current:
        return  # a data module without saved arguments: nothing to compare

    def plain(value: Any) -> Any:
        return str(value) if isinstance(value, Path) else value

    missing = object()
    differ = sorted(
        key for key in set(stored) | set(current)
        if key not in _LOADER_ONLY and plain(stored.get(key, missing)) != plain(current.get(key, missing))
    )
    if differ:
        shown = "; ".join(f"{key}: {stored.get(key, '(absent)')!r} in the checkpoint, "
                          f"{current.get(key, '(absent)')!r} here" for key in differ)
        raise ValueError(
            f"the checkpoint {checkpoint} was trained on other data than this command describes ({shown}); give "
            "baselines the same --data overrides as fit, or another --ckpt_path"
        )


def _run_directory(checkpoint: Path) -> Path:
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def _setup_splits(data: MultimodalDataModule) -> dict[str, int]:
    """Set up ``fit`` and ``test``; the size of each non-empty split (train and val are required)."""
    data.setup("fit")
    data.setup("test")
    samples = {split: len(data.datasets[split]) for split in ("train", "val", "test") if data.has_split(split)}
    missing = [split for split in ("train", "val") if split not in samples]
    if missing:
        raise ValueError(f"{type(data).__name__} has no {missing} split(s); baselines fit on train, select on val")
    return samples


def _in_order(data: MultimodalDataModule, split: str) -> DataLoader:
    """The split's batches in dataset order (no shuffling, so runs repeat), as the data module collates them; the
    training split through the evaluation transform (no random crops or flips) when the data module has one."""
    dataset = data.datasets[split]
    evaluation = getattr(data, "transform", None)
    if split == "train" and callable(evaluation) and hasattr(dataset, "transform"):
        dataset = copy.copy(dataset)
        dataset.transform = evaluation(train=False)
    return DataLoader(dataset, batch_size=data.batch_size, num_workers=data.num_workers, collate_fn=data.collate)


def _score_checkpoint(
    trainer: Trainer, model: nn.Module, data: MultimodalDataModule, checkpoint: Path, with_test: bool
) -> BaselineResult:
    """Validate (and test) the checkpoint with the recipe's Trainer and read its logged scores."""
    # The recipe's callbacks (progress bars, reports) and loggers would print bars and open a new version_N next to
    # the run; the scores come from the model itself. Full splits, like the baselines.
    trainer.callbacks, trainer.loggers = [], []
    trainer.limit_val_batches = trainer.limit_test_batches = 1.0
    kwargs = dict(datamodule=data, ckpt_path=str(checkpoint), verbose=False)
    val = trainer.validate(model, **kwargs)[0]
    test = trainer.test(model, **kwargs)[0] if with_test else None

    def logged(scores: Mapping[str, Any], split: str) -> dict[str, float | None]:
        return {m: float(scores[f"{split}/{m}"]) if f"{split}/{m}" in scores else None for m in METRICS}

    name = "+".join(getattr(model, "modalities", ["fused"]))
    test_scores = None if test is None else logged(test, "test")
    return BaselineResult(name, "trained model", {"checkpoint": checkpoint.name}, logged(val, "val"), test_scores)
