"""Simple baselines on frozen features, beside the trained model: kNN and elastic-net logistic regression on each
modality's pretrained encoder features and on their concatenation (``ml-optim-plugins baselines -c RECIPE``).

A deep model earns trust by beating what a few lines of scikit-learn do with the same pretrained features. The
functional core (:func:`extract_features`, :func:`fit_baselines`) needs no Lightning; :func:`run_baselines` builds
the recipe's model and data with LightningCLI, calls the core and scores the recipe's trained checkpoint beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import sklearn
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.utilities import move_data_to_device
from rich.console import Console
from rich.table import Table
from rich.text import Text
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn
from torch.utils.data import DataLoader

from ml_optim_plugins.data.base import MultimodalDataModule
from ml_optim_plugins.evaluation import module_device
from ml_optim_plugins.multimodal.classifier import MultimodalClassifier

#: Scores of every row, named as the classifier logs them: accuracy, macro-F1, weighted-F1.
METRICS = ("acc", "f1", "f1_weighted")
K_VALUES = (1, 3, 5, 9, 15, 25)
L1_RATIOS = (0.1, 0.5, 0.9)
C_VALUES = (0.01, 0.1, 1.0, 10.0)
_HEADERS = {"acc": "acc", "f1": "macro-F1", "f1_weighted": "weighted-F1"}
# scikit-learn 1.8 deprecated `penalty` (l1_ratio alone sets the mix); before it, l1_ratio needs penalty="elasticnet".
_SKLEARN = tuple(int(part) for part in sklearn.__version__.split(".")[:2])
_ELASTIC_NET = {} if _SKLEARN >= (1, 8) else {"penalty": "elasticnet"}


class LabelledFeatures(NamedTuple):
    """One split's features ``{modality: (samples, dim)}`` and labels ``(samples,)``; unpacks as a pair."""

    features: dict[str, np.ndarray]
    labels: np.ndarray


@dataclass(frozen=True)
class BaselineResult:
    """One row of the comparison: a method on a feature set, the hyperparameters chosen on validation, its scores.

    Attributes:
        features: a modality name, or modality names joined by ``+`` (their concatenated features).
        method: ``"kNN"``, ``"elastic-net"`` or ``"trained model"``.
        params: the hyperparameters chosen on validation macro-F1 (the trained model: its checkpoint file).
        val: ``{"acc", "f1" (macro), "f1_weighted"}`` on validation; ``None`` where a score was not measured.
        test: the same on test; ``None`` without a test split.
        notes: what a reader must know about the row, e.g. fits that stopped at ``max_iter``.
    """

    features: str
    method: str
    params: dict[str, Any]
    val: dict[str, float | None]
    test: dict[str, float | None] | None = None
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class BaselineReport:
    """What :func:`run_baselines` did: the rows (baselines, then the trained model if found) and where they went.

    Attributes:
        results: the table's rows.
        checkpoint: the trained model's checkpoint, or ``None`` when there was none to score.
        samples: samples per split (``train``, ``val`` and, if present, ``test``).
        markdown_path: the table as Markdown (``baselines.md``).
        json_path: the rows as JSON (``baselines.json``).
    """

    results: list[BaselineResult]
    checkpoint: Path | None
    samples: dict[str, int]
    markdown_path: Path
    json_path: Path


def extract_features(model: nn.Module, dataloader: Iterable[Mapping[str, Any]]) -> LabelledFeatures:
    """The features ``model.compute_features(batch)`` gives for every batch of ``dataloader``, with their labels.

    The model runs in eval mode (no dropout, batch-norm statistics frozen) under ``torch.no_grad()``, on its own
    device; each module's train/eval mode is restored afterwards. Works with :class:`MultimodalClassifier` and any
    module with ``compute_features(batch) -> {modality: (batch, dim)}`` and a ``label_key`` (default ``"label"``).

    Args:
        model: the module whose encoders give the features.
        dataloader: batches ``{modality: inputs, ..., label_key: labels}``.

    Returns:
        ``(features, labels)``: ``{modality: float32 (samples, dim)}`` and ``(samples,)``, in the loader's order.

    Raises:
        TypeError: if ``model`` has no ``compute_features``.
        ValueError: if a feature is not ``(batch, dim)`` or the loader yields nothing.

    Example:
        >>> from ml_optim_plugins import MultimodalClassifier, SumFusion
        >>> model = MultimodalClassifier({"a": nn.Linear(4, 8), "b": nn.Linear(6, 8)}, fusion=SumFusion(),
        ...                              num_classes=2, feature_dims={"a": 8, "b": 8})
        >>> batch = {"a": torch.randn(5, 4), "b": torch.randn(5, 6), "label": torch.tensor([0, 1, 0, 1, 1])}
        >>> features, labels = extract_features(model, [batch, batch])
        >>> features["a"].shape, labels.tolist()
        ((10, 8), [0, 1, 0, 1, 1, 0, 1, 0, 1, 1])
    """
    compute = getattr(model, "compute_features", None)
    if compute is None:
        raise TypeError(f"{type(model).__name__} has no compute_features(batch); give a MultimodalClassifier or alike")
    label_key = getattr(model, "label_key", "label")
    device = module_device(model)
    modes = {module: module.training for module in model.modules()}
    chunks: dict[str, list[np.ndarray]] = defaultdict(list)
    labels: list[np.ndarray] = []
    model.eval()
    try:
        with torch.no_grad():
            for batch in dataloader:
                batch = move_data_to_device(batch, device)
                for name, value in compute(batch).items():
                    if value.ndim != 2:
                        raise ValueError(f"features of {name!r} have shape {tuple(value.shape)}; expected (batch, dim)")
                    chunks[name].append(value.float().cpu().numpy())
                labels.append(batch[label_key].cpu().numpy())
    finally:
        for module, training in modes.items():
            module.training = training
    if not labels:
        raise ValueError("the dataloader yielded no batches; is the split empty?")
    return LabelledFeatures({name: np.concatenate(parts) for name, parts in chunks.items()}, np.concatenate(labels))


def fit_baselines(
    train: tuple[Mapping[str, np.ndarray], np.ndarray],
    val: tuple[Mapping[str, np.ndarray], np.ndarray],
    test: tuple[Mapping[str, np.ndarray], np.ndarray] | None = None,
    *,
    k_values: Sequence[int] = K_VALUES,
    l1_ratios: Sequence[float] = L1_RATIOS,
    c_values: Sequence[float] = C_VALUES,
    max_iter: int = 5000,
    tol: float = 1e-3,
    seed: int = 0,
) -> list[BaselineResult]:
    """Fit kNN and elastic-net logistic regression on each modality's features and on their concatenation.

    Both standardise the features first. kNN tries each ``k`` in ``k_values`` up to the number of training samples;
    the logistic regression (saga solver) tries every ``C`` x ``l1_ratio`` pair. Each keeps the setting with the best
    validation macro-F1 (ties go to the more regularised one: larger ``k``, smaller ``C``); test is only scored,
    never looked at for selection. A fit that stops at ``max_iter`` is noted in the row, not warned about.

    Args:
        train: ``(features, labels)`` to fit on, ``features`` being ``{modality: (samples, dim)}``.
        val: the same for the selection of hyperparameters.
        test: the same to report on, or ``None``.
        k_values: numbers of neighbours to try.
        l1_ratios: elastic-net mixes to try (0: L2, 1: L1).
        c_values: inverse regularisation strengths to try.
        max_iter: saga epochs per fit.
        tol: saga's stopping tolerance (relative change of the weights). scikit-learn's default, 1e-4, makes the
            weakly regularised fits on a few thousand samples crawl (5x slower) for no change in the chosen setting.
        seed: saga's shuffling seed.

    Returns:
        One :class:`BaselineResult` per feature set (each modality, then all concatenated) and method (kNN,
        elastic-net), in that order.

    Raises:
        ValueError: if the splits have different modalities or sizes, training has fewer than two classes, or a grid
            is empty.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> def split(n):
        ...     y = rng.integers(0, 2, n)
        ...     return {"image": rng.normal(3.0 * y[:, None], 1.0, (n, 4)), "text": rng.normal(size=(n, 3))}, y
        >>> results = fit_baselines(split(60), split(30), split(30))
        >>> [(r.features, r.method) for r in results]  # doctest: +NORMALIZE_WHITESPACE
        [('image', 'kNN'), ('image', 'elastic-net'), ('text', 'kNN'), ('text', 'elastic-net'),
         ('image+text', 'kNN'), ('image+text', 'elastic-net')]
        >>> results[0].test["acc"] > 0.9, sorted(results[1].params)
        (True, ['C', 'l1_ratio'])
    """
    grids = {"k_values": k_values, "l1_ratios": l1_ratios, "c_values": c_values}
    empty = [name for name, grid in grids.items() if not len(grid)]
    if empty:
        raise ValueError(f"{', '.join(empty)} empty; give at least one value to try")
    splits = {"train": train, "val": val} | ({"test": test} if test is not None else {})
    sets = {split: _feature_sets(*data, split=split) for split, data in splits.items()}
    labels = {split: np.asarray(data[1]) for split, data in splits.items()}
    for split in sets:
        if list(sets[split]) != list(sets["train"]):
            raise ValueError(f"{split} has modalities {list(sets[split])}, train has {list(sets['train'])}")
    if len(np.unique(labels["train"])) < 2:
        raise ValueError(f"train has only the classes {np.unique(labels['train']).tolist()}; need at least two")
    n_train = len(labels["train"])
    ks = sorted({k for k in k_values if k <= n_train} or {n_train}, reverse=True)
    knn_grid = [{"k": k} for k in ks]
    net_grid = [{"C": c, "l1_ratio": r} for c in sorted(c_values) for r in l1_ratios]

    def knn(k: int) -> Pipeline:
        return make_pipeline(StandardScaler(), KNeighborsClassifier(n_neighbors=k))

    def net(C: float, l1_ratio: float) -> Pipeline:  # noqa: N803 - scikit-learn's name
        return make_pipeline(
            StandardScaler(),
            LogisticRegression(
                C=C, l1_ratio=l1_ratio, solver="saga", max_iter=max_iter, tol=tol, random_state=seed, **_ELASTIC_NET
            ),
        )

    results = []
    for name in sets["train"]:
        data = {split: (sets[split][name], labels[split]) for split in sets}
        results.append(_select(name, "kNN", knn_grid, knn, data))
        results.append(_select(name, "elastic-net", net_grid, net, data, f"max_iter={max_iter}", path="C"))
    return results


def _feature_sets(features: Mapping[str, np.ndarray], labels: np.ndarray, split: str) -> dict[str, np.ndarray]:
    """Each modality's features as float64, then (with two or more) all of them concatenated as ``"a+b"``."""
    sets = {name: np.asarray(value, dtype=np.float64) for name, value in features.items()}
    for name, value in sets.items():
        if value.ndim != 2 or len(value) != len(labels):
            raise ValueError(f"{split} features {name!r} have shape {value.shape}; expected ({len(labels)}, dim)")
    if len(sets) > 1:
        sets["+".join(sets)] = np.concatenate(list(sets.values()), axis=1)
    return sets


def _select(
    features: str,
    method: str,
    grid: Sequence[dict[str, Any]],
    build: Callable[..., Pipeline],
    data: Mapping[str, tuple[np.ndarray, np.ndarray]],
    limit: str = "",
    path: str | None = None,
) -> BaselineResult:
    """Fit ``build(**params)`` for each ``params`` of ``grid`` on train; keep the first best (in ``grid`` order) on
    validation macro-F1.

    With ``path`` (a parameter of the pipeline's last step, e.g. ``"C"``), settings that differ only in it are fitted
    in increasing order, each warm-started from the previous solution (a regularisation path, as glmnet walks it):
    the same optima, in a fraction of saga's epochs.
    """
    (x, y), (x_val, y_val) = data["train"], data["val"]
    order = list(range(len(grid)))
    if path is not None:
        order.sort(key=lambda i: (sorted((k, v) for k, v in grid[i].items() if k != path), grid[i][path]))
    fitted: dict[int, tuple[float, Pipeline, bool]] = {}
    previous: tuple[dict[str, Any], Pipeline] | None = None
    for i in order:
        params = grid[i]
        same_path = previous is not None and all(previous[0][k] == v for k, v in params.items() if k != path)
        if path is not None and same_path:
            estimator = previous[1]
            estimator.set_params(**{f"{estimator.steps[-1][0]}__{path}": params[path]})
        else:
            estimator = build(**params)
            if path is not None:
                estimator.set_params(**{f"{estimator.steps[-1][0]}__warm_start": True})
        converged = _fit_quietly(estimator, x, y)
        score = f1_score(y_val, estimator.predict(x_val), average="macro", zero_division=0)
        fitted[i] = (score, copy.deepcopy(estimator) if path is not None else estimator, converged)
        previous = (params, estimator)
    best = max(range(len(grid)), key=lambda i: (fitted[i][0], -i))
    _, estimator, converged = fitted[best]
    unconverged = sum(not done for _, _, done in fitted.values())
    notes = ()
    if unconverged:
        chosen = "" if converged else ", the chosen one among them"
        notes = (f"{unconverged}/{len(grid)} fits stopped at {limit} before converging{chosen}",)
    scores = {split: _scores(y_true, estimator.predict(x_split)) for split, (x_split, y_true) in data.items()}
    return BaselineResult(features, method, dict(grid[best]), scores["val"], scores.get("test"), notes)


def _fit_quietly(estimator: Pipeline, x: np.ndarray, y: np.ndarray) -> bool:
    """Fit; whether it converged (its ``ConvergenceWarning`` is swallowed, other warnings pass through)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        estimator.fit(x, y)
    converged = True
    for warning in caught:
        if issubclass(warning.category, ConvergenceWarning):
            converged = False
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return converged


def _scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float | None]:
    return {
        "acc": float(accuracy_score(y_true, y_pred)),
        "f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "f1_weighted": float(f1_score(y_true, y_pred, average="weighted", zero_division=0)),
    }


def _cells(results: Sequence[BaselineResult]) -> tuple[list[str], list[list[str]]]:
    """Header and rows shared by the terminal and Markdown tables (test columns only if some row has test)."""
    splits = ["val"] + (["test"] if any(r.test is not None for r in results) else [])
    with_notes = any(r.notes for r in results)
    header = ["features", "method", "hyperparameters"]
    header += [f"{split} {_HEADERS[m]}" for split in splits for m in METRICS] + (["notes"] if with_notes else [])

    def number(scores: Mapping[str, float | None] | None, metric: str) -> str:
        value = None if scores is None else scores.get(metric)
        return "-" if value is None else f"{value:.3f}"

    rows = []
    for r in results:
        params = ", ".join(f"{key}={value}" for key, value in r.params.items())
        row = [r.features, r.method, params] + [number(getattr(r, s), m) for s in splits for m in METRICS]
        rows.append(row + (["; ".join(r.notes)] if with_notes else []))
    return header, rows


def baselines_table(results: Sequence[BaselineResult], title: str = "baselines on frozen features") -> Table:
    """The rows as a rich :class:`~rich.table.Table` (scores to 3 decimals, ``-`` where not measured).

    Example:
        >>> row = BaselineResult("image", "kNN", {"k": 5}, {"acc": 0.9, "f1": 0.88, "f1_weighted": 0.89})
        >>> baselines_table([row]).columns[3].header
        'val acc'
    """
    header, rows = _cells(results)
    table = Table(title=title)
    for index, name in enumerate(header):
        table.add_column(name, justify="right" if 3 <= index < len(header) - (header[-1] == "notes") else "left")
    for row in rows:
        table.add_row(*map(Text, row))  # as text: a checkpoint name may hold [brackets]
    return table


def baselines_markdown(results: Sequence[BaselineResult]) -> str:
    """The rows as a Markdown table (the same cells as :func:`baselines_table`).

    Example:
        >>> row = BaselineResult("text", "kNN", {"k": 3}, {"acc": 0.5, "f1": 0.4, "f1_weighted": None})
        >>> print(baselines_markdown([row]).splitlines()[2])
        | text | kNN | k=3 | 0.500 | 0.400 | - |
    """
    header, rows = _cells(results)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


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
    from ml_optim_plugins.cli import MultimodalCLI  # cli dispatches to this module

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
    report = _write(results, checkpoint, samples, output_dir)
    console.print(baselines_table(results, title=f"baselines on frozen features ({_sizes(samples)})"))
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


def _sizes(samples: Mapping[str, int]) -> str:
    return ", ".join(f"{size} {split}" for split, size in samples.items())


def _write(
    results: list[BaselineResult], checkpoint: Path | None, samples: dict[str, int], output_dir: Path
) -> BaselineReport:
    output_dir.mkdir(parents=True, exist_ok=True)
    markdown, json_path = output_dir / "baselines.md", output_dir / "baselines.json"
    shown = checkpoint.resolve() if checkpoint else "none found"
    markdown.write_text(
        f"# Baselines on frozen features\n\nSamples: {_sizes(samples)}. Trained model: {shown}.\n"
        "Hyperparameters chosen on validation macro-F1; test is only scored.\n\n" + baselines_markdown(results)
    )
    payload = {
        "checkpoint": str(checkpoint.resolve()) if checkpoint else None,
        "samples": samples,
        "results": [asdict(result) for result in results],
    }
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    return BaselineReport(results, checkpoint, samples, markdown, json_path)
