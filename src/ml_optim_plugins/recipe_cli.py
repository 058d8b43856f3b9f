"""The recipe CLI: :class:`MultimodalCLI`, LightningCLI for the library's model and data modules, which builds and
runs ``recipes/NAME.yaml`` for ``ml-optim-plugins fit|validate|test|predict`` (:func:`run`), with the checks and the
run summary around it. The console entry point itself is :func:`ml_optim_plugins.cli.main`."""

from __future__ import annotations

import csv
import math
import re
import sys
import warnings
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only
from rich.console import Console
from rich.table import Table

from ml_optim_plugins.checkpoints import IGNORED_DATA_KEYS, check_checkpoint_config
from ml_optim_plugins.data.base import MultimodalDataModule
from ml_optim_plugins.encoder_overrides import merge_encoder_overrides
from ml_optim_plugins.lightning_internals import (
    logger_version_unset,
    logging_step,
    prepend_csv_rows,
    set_logger_version,
)
from ml_optim_plugins.multimodal.classifier import MultimodalClassifier
from ml_optim_plugins.prediction.command import prepare_predict, print_predict_command


class MultimodalCLI(LightningCLI):
    """LightningCLI for :class:`MultimodalClassifier` (or a subclass) and any :class:`MultimodalDataModule`.

    ``data.num_classes``, ``data.class_names`` and ``data.preprocessing`` are linked to the model's (so checkpoints
    carry the label names and the preprocessing). After ``fit`` / ``validate`` / ``test`` it prints the final
    metrics, the log directory and the best checkpoint. ``fit`` then tests the best checkpoint (selected on
    validation) when the data has a test split (``--test_after_fit false`` turns that off), so a
    :class:`~ml_optim_plugins.RunReport` gets its test column, and prints the command that predicts with it.
    ``predict`` refuses a checkpoint whose labels or preprocessing differ from the data's and writes
    ``predictions.csv`` (:func:`~ml_optim_plugins.prediction.command.prepare_predict`).

    Overrides of ``model.init_args.encoders`` (a second ``-c`` file, ``--model.init_args.encoders.image...``) are
    merged per modality, so one encoder changes and the others stay, and ``null`` means None there too
    (:func:`~ml_optim_plugins.encoder_overrides.merge_encoder_overrides`). A ``fit`` that would train nothing
    (``max_epochs``, ``max_steps`` or ``limit_train_batches`` of 0) is refused before it starts.

    Example:
        >>> MultimodalCLI(args=["fit", "-c", "recipes/quickstart.yaml"])  # doctest: +SKIP
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._quiet_resume: Any = None
        try:
            super().__init__(*args, **kwargs)  # runs the subcommand
        finally:  # a fit that failed before after_fit leaves no warning filter behind either
            self._end_quiet_resume()

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.init_args.class_names", apply_on="instantiate")
        parser.link_arguments("data.preprocessing", "model.init_args.preprocessing", apply_on="instantiate")
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=True,
            help="fit only: test the best checkpoint (selected on validation) when the data has a test split",
        )
        parser.add_argument(
            "--allow_config_change",
            type=bool,
            default=False,
            help="use a --ckpt_path saved with another model or data configuration than this run's (refused otherwise)",
        )

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:  # noqa: D102 - LightningCLI hook
        # Overrides of one encoder keep the others (docs/recipes.md); see encoder_overrides.py.
        argv = None if isinstance(args, (dict, Namespace)) else sys.argv[1:] if args is None else list(args)
        merged = None if argv is None else merge_encoder_overrides(argv)
        if args is None and merged != argv:
            self.config = parser.parse_args(merged)  # not as args=: LightningCLI would warn about sys.argv
        else:
            super().parse_arguments(parser, args if args is None or merged is None else merged)
        self._check_parsed_model_config()

    def instantiate_classes(self) -> None:  # noqa: D102 - LightningCLI hook
        super().instantiate_classes()
        check_image_preprocessing(self.model, self.datamodule)

    def instantiate_trainer(self, **kwargs):  # noqa: D102 - LightningCLI hook
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        drop_disabled_progress_bars(config.get("trainer") or {})
        trainer = super().instantiate_trainer(**kwargs)
        if self.subcommand == "fit":
            ckpt_path = self.config["fit"].get("ckpt_path")
            # Lightning would warn that the run directory is not empty (each ModelCheckpoint, and the CSV logger that
            # its old files will be deleted): it must hold them, and metrics.csv's rows are carried over. For this fit.
            pattern = not_empty_warning(run_directory(ckpt_path))
            self._end_quiet_resume()  # a trainer instantiated again (a subclass's second fit) replaces the filter
            if pattern:
                self._quiet_resume = warnings.catch_warnings()
                self._quiet_resume.__enter__()
                warnings.filterwarnings("ignore", message=pattern)
            resume_in_run_directory(trainer, ckpt_path)
        align_logger_versions(trainer)
        return trainer

    def _check_parsed_model_config(self) -> None:
        # Before LightningCLI replaces the parsed model config with the checkpoint's saved hyperparameters (which would
        # make a checkpoint of another model silently win over the config the user gave).
        subcommand = self.config.get("subcommand")
        config = self.config.get(subcommand) if subcommand else None
        ckpt_path = _comparable_ckpt_path(config)
        if ckpt_path and config.get("model") is not None:
            check_checkpoint_config(ckpt_path, config["model"].as_dict(), model_ignore=LINKED_MODEL_ARGS)

    def _check_ckpt_path(self) -> None:
        # The data configuration, once instantiated (the model's was compared in parse_arguments).
        ckpt_path = _comparable_ckpt_path(self.config[self.subcommand])
        if ckpt_path:
            # Evaluating or predicting, the batch size changes no figure; resuming fit, it changes the run.
            ignore = IGNORED_DATA_KEYS if self.subcommand == "fit" else (*IGNORED_DATA_KEYS, "batch_size")
            check_checkpoint_config(ckpt_path, None, getattr(self.datamodule, "hparams", None), data_ignore=ignore)

    def before_fit(self) -> None:
        check_fit_trains(self.trainer)
        self._check_ckpt_path()

    def before_validate(self) -> None:
        self._check_ckpt_path()

    def before_test(self) -> None:
        self._check_ckpt_path()

    def _end_quiet_resume(self) -> None:
        quiet, self._quiet_resume = self._quiet_resume, None
        if quiet is not None:
            quiet.__exit__(None, None, None)

    def after_fit(self) -> None:
        self._end_quiet_resume()
        print_run_summary(self.trainer, "fit")
        trainer, data = self.trainer, self.datamodule
        wanted = self.config["fit"].get("test_after_fit", True)
        has_test = getattr(data, "has_split", lambda split: False)("test")
        if wanted and has_test and not trainer.interrupted and not trainer.fast_dev_run:
            # The model selected on validation, evaluated once on test: the figures a run report and a paper may quote.
            best = getattr(trainer.checkpoint_callback, "best_model_path", "")
            trainer.test(self.model, datamodule=data, ckpt_path=best or None, verbose=False)
            print_run_summary(trainer, "test")
        if not trainer.interrupted and not trainer.fast_dev_run:
            print_predict_command(trainer, self.config["fit"].get("config") or ())

    def before_predict(self) -> None:  # noqa: D102 - LightningCLI hook
        prepare_predict(self.trainer, self.datamodule, self.config["predict"].get("ckpt_path"))
        self._check_ckpt_path()

    def after_validate(self) -> None:
        print_run_summary(self.trainer, "validate")

    def after_test(self) -> None:
        print_run_summary(self.trainer, "test")


# Model arguments the CLI links from the data module: in a checkpoint, absent from a parsed config.
LINKED_MODEL_ARGS = ("init_args.num_classes", "init_args.class_names", "init_args.preprocessing")
# --ckpt_path values that Lightning resolves itself, not files.
SYMBOLIC_CKPT_PATHS = ("last", "best", "hpc", "registry")


def _comparable_ckpt_path(config: object) -> str | None:
    """The ``--ckpt_path`` of a subcommand's config, if it names a file to compare with the run's configuration."""
    if config is None or config.get("allow_config_change"):
        return None
    ckpt_path = config.get("ckpt_path")
    if not ckpt_path or ckpt_path in SYMBOLIC_CKPT_PATHS or not Path(ckpt_path).is_file():
        return None
    return str(ckpt_path)


def check_image_preprocessing(model: object, data: object) -> None:
    """Refuse a recipe whose data module prepares images for another network than its timm image encoder.

    Pretrained weights expect their own mean, std and input size (timm's data config); the data modules take them
    from ``image_model``. An encoder with ImageNet weights (``pretrained``) fed by data without ``image_model``, or an
    ``image_model`` whose config differs from the encoder's, is a silent accuracy loss: raised before training.

    Raises:
        ValueError: naming the encoder, the data module's ``image_model`` and the setting to change.
    """
    from ml_optim_plugins.data.transforms import image_data_config
    from ml_optim_plugins.multimodal.encoders import TimmImageEncoder

    hparams = getattr(data, "hparams", {})
    if "image_model" not in hparams:
        return
    image_model = hparams["image_model"]
    for name, encoder in dict(getattr(model, "encoders", {}) or {}).items():
        if not isinstance(encoder, TimmImageEncoder):
            continue
        key = f"data.init_args.image_model: {encoder.model_name}"
        if image_model is None:
            if encoder.pretrained:
                raise ValueError(
                    f"the {name!r} encoder {encoder.model_name!r} has pretrained={encoder.pretrained!r} weights, but the "
                    f"data module prepares images without its preprocessing (image_model=None); set {key}"
                )
            continue
        wanted, given = encoder.data_config, image_data_config(image_model)
        differs = [k for k in ("mean", "std", "interpolation") if wanted.get(k) != given.get(k)]
        if differs:
            raise ValueError(
                f"the {name!r} encoder is {encoder.model_name!r} but the data module prepares images for "
                f"image_model={image_model!r} ({', '.join(f'{k} {given.get(k)} instead of {wanted.get(k)}' for k in differs)}); "
                f"set {key}"
            )


def drop_disabled_progress_bars(trainer_config: Namespace | dict) -> None:
    """With ``--trainer.enable_progress_bar false`` on a recipe whose callbacks list a progress bar (all the shipped
    recipes list ``RichProgressBar``), take the bar out of the callbacks: Lightning refuses the combination, and the
    flag says what the user wants.

    Example:
        >>> from lightning.pytorch.callbacks import RichProgressBar, LearningRateMonitor
        >>> config = {"enable_progress_bar": False, "callbacks": [RichProgressBar(), LearningRateMonitor()]}
        >>> drop_disabled_progress_bars(config)
        >>> [type(c).__name__ for c in config["callbacks"]]
        ['LearningRateMonitor']
    """
    callbacks = trainer_config.get("callbacks") or []
    if trainer_config.get("enable_progress_bar") is not False or not isinstance(callbacks, list):
        return
    kept = [c for c in callbacks if not isinstance(c, ProgressBar)]
    if len(kept) < len(callbacks):
        dropped = ", ".join(type(c).__name__ for c in callbacks if isinstance(c, ProgressBar))
        rank_zero_info(f"enable_progress_bar=False: {dropped} taken out of trainer.callbacks")
        trainer_config["callbacks"] = kept


def check_fit_trains(trainer: Trainer) -> None:
    """Refuse a ``fit`` that would train nothing (``max_epochs``, ``max_steps`` or ``limit_train_batches`` of 0): its
    untrained model would then be validated, saved and tested as if it were a result.

    Raises:
        ValueError: naming the setting.
    """
    settings = {"max_epochs": trainer.max_epochs, "max_steps": trainer.max_steps,
                "limit_train_batches": trainer.limit_train_batches}
    zero = [f"trainer.{name}={value}" for name, value in settings.items() if value == 0]
    if zero:
        raise ValueError(
            f"{', '.join(zero)}: fit would train nothing, and the untrained model would be validated and tested; set "
            "it to 1 or more (to evaluate a checkpoint, use the validate or test command with --ckpt_path)"
        )


def format_metric(value: float) -> str:
    """Four decimals for the usual metric range, scientific notation for small or large values (learning rates such
    as 3e-05 would read ``0.0000``).

    Example:
        >>> format_metric(0.8125), format_metric(3e-05), format_metric(0.0)
        ('0.8125', '3.000e-05', '0.0000')
    """
    if value == 0 or 1e-3 <= abs(value) < 1e5 or not math.isfinite(value):
        return f"{value:.4f}"
    return f"{value:.3e}"


def print_run_summary(trainer: Trainer, stage: str) -> None:
    """Print the final epoch metrics, the log directory and the best checkpoint (rank 0 only)."""
    log_dir = trainer.log_dir  # a collective under DDP: every rank must ask
    if not trainer.is_global_zero:
        return
    title = f"ml-optim-plugins {stage}: final metrics"
    table = Table(title=title, min_width=len(title) + 4)
    table.add_column("metric")
    table.add_column("value", justify="right")
    final = {
        name.removesuffix("_epoch"): float(value)
        for name, value in trainer.callback_metrics.items()
        if "/" in name and not name.endswith("_step")
    }
    for name, value in sorted(final.items()):
        table.add_row(name, format_metric(value))
    console = Console()
    console.print(table)
    if log_dir:
        console.print(f"logs (CSV, TensorBoard, config): {Path(log_dir).resolve()}", soft_wrap=True)
    checkpoint = getattr(trainer.checkpoint_callback, "best_model_path", "")
    if checkpoint:
        score = trainer.checkpoint_callback.best_model_score
        shown = "" if score is None else f" ({trainer.checkpoint_callback.monitor} = {float(score):.4f})"
        console.print(f"best checkpoint{shown}: {Path(checkpoint).resolve()}", soft_wrap=True)


def resume_in_run_directory(trainer: Trainer, ckpt_path: str | None) -> None:
    """Resuming ``fit`` from ``<save_dir>/<name>/version_N/checkpoints/X.ckpt``: the loggers that write under that
    ``save_dir/name`` continue in ``version_N`` instead of opening a new version.

    One run keeps one directory (metrics.csv keeps its rows, the report covers the whole run), and ModelCheckpoint,
    whose directory is then the same, restores its best score and best checkpoints; in a new directory Lightning resets
    them and the first validation after the resume would become the "best" checkpoint. ``metrics.csv`` keeps the rows
    logged before the checkpoint's step; the rows that the interrupted run wrote after it are dropped, since the
    resumed run logs those steps again (:class:`ResumedMetricRows`).
    """
    version_dir = run_directory(ckpt_path)
    if version_dir is None:
        return
    for logger in trainer.loggers:
        save_dir = getattr(logger, "save_dir", None)
        same_place = save_dir is not None and Path(save_dir, logger.name).resolve() == version_dir.parent
        if same_place and set_logger_version(logger, int(version_dir.name.removeprefix("version_"))):
            if isinstance(logger, CSVLogger) and getattr(rank_zero_only, "rank", 0) == 0:
                trainer.callbacks.append(ResumedMetricRows(logger))


def run_directory(ckpt_path: str | None) -> Path | None:
    """The run directory ``<save_dir>/<name>/version_N`` of a checkpoint saved in its ``checkpoints/``, or ``None``.

    Example:
        >>> run_directory("runs/quickstart/version_3/checkpoints/last.ckpt").parts[-2:]
        ('quickstart', 'version_3')
        >>> run_directory("model.ckpt") is None, run_directory("last") is None
        (True, True)
    """
    if not ckpt_path or ckpt_path in SYMBOLIC_CKPT_PATHS:
        return None
    path = Path(ckpt_path).resolve()
    version_dir = path.parent.parent
    suffix = version_dir.name.removeprefix("version_")
    if path.parent.name != "checkpoints" or not version_dir.name.startswith("version_") or not suffix.isdigit():
        return None
    return version_dir


def not_empty_warning(version_dir: Path | None) -> str | None:
    """A ``warnings`` filter pattern for Lightning's "directory ... exists and is not empty" about this run directory
    or its ``checkpoints/`` (the path as Lightning writes it may be relative), and no other.

    Example:
        >>> import re
        >>> pattern = not_empty_warning(Path("/x/runs/quickstart/version_1"))
        >>> bool(re.match(pattern, "Checkpoint directory runs/quickstart/version_1/checkpoints exists and is not empty."))
        True
        >>> bool(re.match(pattern, "Checkpoint directory runs/quickstart/version_10/checkpoints exists and is not empty."))
        False
    """
    if version_dir is None:
        return None
    run = re.escape(version_dir.parent.name) + r"[/\\]" + re.escape(version_dir.name)
    return rf"(Checkpoint|Experiment logs) directory (.*[/\\])?{run}([/\\]checkpoints)? exists and is not empty"


class ResumedMetricRows(Callback):
    """Carries the rows of a run directory's ``metrics.csv`` into a resumed run's CSV logger, up to the step the run
    resumes at.

    Lightning's CSV writer deletes ``metrics.csv`` when it opens an existing directory (at the start of the fit), so
    the rows are read first and handed back to the writer, which writes them before the resumed run's rows. Rows of the
    steps from the resume step on were written by the interrupted run after its checkpoint and are logged again by the
    resumed run: they are dropped, so each step appears once. A resume refused before the fit leaves the file as it
    was; a fit that fails before its first batch hands all of them back to the writer, which writes them when Lightning
    finalizes the failed run.
    """

    def __init__(self, logger: CSVLogger) -> None:
        self.logger = logger
        self.path = Path(logger.log_dir) / "metrics.csv"
        self.rows: list[dict[str, str]] | None = []
        if self.path.is_file():
            with self.path.open(newline="") as handle:
                self.rows = [{key: value for key, value in row.items() if value != ""} for row in csv.DictReader(handle)]

    def on_train_batch_start(self, trainer: Trainer, pl_module: object, batch: object, batch_idx: int) -> None:
        if self.rows is None:
            return
        resume_step = logging_step(trainer)  # the first batch's step, once Lightning has placed the resumed loop
        kept = [row for row in self.rows if not row.get("step") or int(float(row["step"])) < resume_step]
        prepend_csv_rows(self.logger.experiment, kept)  # before the rows other callbacks logged at this batch's start
        self.rows = None

    def on_exception(self, trainer: Trainer, pl_module: object, exception: BaseException) -> None:
        rows, self.rows = self.rows, None
        # None: handed to the writer already. metrics.csv still there: the fit failed before the writer opened the
        # directory (before its setup). Otherwise the writer deleted it and has written nothing yet (it saves after
        # training batches): the rows go before what it holds, and Lightning's finalize of the failed run writes them.
        if rows and not self.path.is_file():
            prepend_csv_rows(self.logger.experiment, rows)


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
        if same_place and logger_version_unset(logger):
            set_logger_version(logger, first.version)


def run(args: list[str] | None = None) -> MultimodalCLI:
    """Run the CLI on ``args`` (default: ``sys.argv``) and return it, for scripts and tests.

    Unlike :func:`~ml_optim_plugins.cli.main` it leaves a DDP process group alive, so the caller can use the trainer further; a script that
    calls it under DDP ends with :func:`~ml_optim_plugins.process_group.destroy_default_process_group`.
    """
    return MultimodalCLI(
        MultimodalClassifier,
        MultimodalDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )
