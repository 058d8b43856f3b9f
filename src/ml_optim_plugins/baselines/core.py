"""The scikit-learn core of the baselines: features from a model's frozen encoders (:func:`extract_features`) and
kNN / elastic-net logistic regression fitted on them, hyperparameters chosen on validation (:func:`fit_baselines`)."""

from __future__ import annotations

import copy
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import sklearn
import torch
from lightning.pytorch.utilities import move_data_to_device
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from ml_optim_plugins.module_copy import module_device

#: Scores of every row, named as the classifier logs them: accuracy, macro-F1, weighted-F1.
METRICS = ("acc", "f1", "f1_weighted")
K_VALUES = (1, 3, 5, 9, 15, 25)
L1_RATIOS = (0.1, 0.5, 0.9)
C_VALUES = (0.01, 0.1, 1.0, 10.0)
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
