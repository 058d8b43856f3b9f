"""MVSA-Single end to end: every row of the comparison, three split seeds, results written as each run finishes.

    python benchmarks/mvsa_single.py --root data/MVSA_Single --results docs/results/mvsa_single.jsonl \
        --rows majority frozen recipe --seeds 0 1 2
    python benchmarks/mvsa_single.py --summarize docs/results/mvsa_single.jsonl

Rows (``--rows``):

* ``majority``: the training split's most frequent class.
* ``frozen``: ``ml-optim-plugins baselines``' core (k-NN and elastic-net logistic regression, hyperparameters chosen on
  validation macro-F1) on the frozen pretrained features of each modality and of both; the features of all posts are
  extracted once (evaluation transform) and cached under ``--work``.
* ``--probe ROW``: each modality's linear probe after training (elastic net on the features of ``ROW``'s selected
  checkpoint; an encoder the run kept frozen reuses the frozen features): does balancing lift the weak modality?
* trained rows (:data:`TRAINED`): ``recipes/mvsa_single.yaml`` with the changes each row names, run by the CLI in a
  child process (``fit``, then the checkpoint selected on validation macro-F1 is tested). A row records test accuracy,
  macro-F1 and weighted-F1 of the fused model and of each modality's own prediction, the epoch selected, wall time per
  training epoch and per run.

Splits are :class:`~ml_optim_plugins.MVSADataModule`'s seeded 8:1:1 split (``split_seed`` = the seed; the training seed
too), or with ``--split-dir`` the published folds of Cheema et al. (``--seeds`` are then fold numbers). A row already in
``--results`` for the same row, seed and split protocol is skipped, so an interrupted sweep resumes where it was; a row
interrupted resumes from its run's ``checkpoints/last.ckpt``, saved after every validation (the epoch in progress is
trained again; the recipe's ``ExactResume`` makes the resumed run continue as the uninterrupted one would have; a row
whose training had ended, by early stopping or at ``max_epochs``, is only tested), or from epoch 0 with ``--fresh``.
A row that fails is reported and the sweep goes on with the next, exiting non-zero at the end.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "mvsa_single.yaml"
METRICS = ("acc", "f1", "f1_weighted")
EN_L1_RATIOS = (0.5,)
EN_C_VALUES = (0.01, 0.1, 1.0)


class EpochTimes(pl.Callback):
    """Wall time of each training epoch (the training loop only, validation excluded) and of the whole fit, and the
    machine's 1-minute load average as each epoch ended (a time taken beside other jobs says so); kept in the
    checkpoint, so a row resumed from its ``last.ckpt`` reports every epoch and the fit time of all its parts."""

    def __init__(self) -> None:
        self.epochs: list[float] = []
        self.loads: list[float | None] = []
        self.validation = 0.0
        self._start: float | None = None
        self._val_start = self._fit_start = 0.0
        self.restored = False
        self.fit: dict[str, Any] = {}  # at fit end: epochs, loads, seconds (all attempts), earlier_seconds, ...
        self.earlier_seconds = 0.0  # fit seconds of the earlier processes of a resumed run

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_start = time.perf_counter()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start, self.validation = time.perf_counter(), 0.0

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._val_start = time.perf_counter()
        if self._start is not None and not trainer.sanity_checking and trainer.is_last_batch:
            # The epoch-end validation: the epoch's training time is known now, before the checkpoint is saved.
            self._end_epoch(self._val_start)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.validation += time.perf_counter() - self._val_start

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._start is not None:  # an epoch without an epoch-end validation
            self._end_epoch(time.perf_counter())

    def _end_epoch(self, now: float) -> None:
        self.epochs.append(now - self._start - self.validation)
        self.loads.append(os.getloadavg()[0] if hasattr(os, "getloadavg") else None)
        self._start = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Kept apart: testing the best checkpoint afterwards loads that checkpoint's (earlier) state into this callback.
        self.fit = {"epochs": list(self.epochs), "loads": list(self.loads), "seconds": self._seconds(),
                    "earlier_seconds": self.earlier_seconds, "resumed_with_times": self.restored}

    def state_dict(self) -> dict[str, Any]:
        return {"epochs": list(self.epochs), "loads": list(self.loads), "fit_seconds": self._seconds()}

    def _seconds(self) -> float:
        return self.earlier_seconds + time.perf_counter() - self._fit_start

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epochs, self.earlier_seconds, self.restored = list(state_dict["epochs"]), state_dict["fit_seconds"], True
        # A checkpoint written before the loads were kept: those epochs' loads are unknown.
        self.loads = list(state_dict.get("loads", [None] * len(self.epochs)))


def revision(path: Path) -> str | None:
    """The git commit (12 digits) of the checkout whose tracked files hold ``path``, with ``+dirty`` when tracked files
    under ``path`` differ from it (untracked ones do not count, as for ``git describe --dirty``); None where ``path``
    is not tracked by git (an installed wheel, a copy)."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True, check=True)
        return done.stdout.strip()
    try:
        if not git("ls-files", "--", "."):
            return None
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".")
        return git("rev-parse", "--short=12", "HEAD") + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def _callbacks(config: dict) -> list[dict]:
    return config["trainer"]["callbacks"]


def _drop(config: dict, name: str) -> None:
    config["trainer"]["callbacks"] = [c for c in _callbacks(config) if not c["class_path"].endswith("." + name)]


def _callback(config: dict, name: str) -> dict:
    for callback in _callbacks(config):
        if callback["class_path"].endswith("." + name):
            return callback.setdefault("init_args", {})
    raise KeyError(f"the recipe has no {name} callback")


def _balancing(method: str | None, aux: float = 0.0) -> Callable[[dict], None]:
    def change(config: dict) -> None:
        config["model"]["init_args"]["aux_loss_weight"] = aux
        if method is None:
            _drop(config, "ModalityBalancer")
        else:
            _callback(config, "ModalityBalancer")["method"] = method
    return change


def _no_gaussian_dropout(config: dict) -> None:
    """No dropout of any kind on the fused features (the fusion's rate 0)."""
    config["model"]["init_args"]["fusion"]["init_args"]["dropout"] = 0.0


def _end_to_end(config: dict) -> None:
    """No stages: every encoder trains from the first step at the recipe's finetuning LR multiplier (the recipe
    unfreezes MiniLM only, at 0.1x the head's LR; EfficientNet takes the same 0.1x, not the head's full LR)."""
    multipliers = _callback(config, "LinearProbeFinetune")["lr_multipliers"]
    _drop(config, "LinearProbeFinetune")
    finetune = min(multipliers.values())
    _callback(config, "WarmupDecay")["lr_multipliers"] = {
        f"encoders.{m}": multipliers.get(m, finetune) for m in config["model"]["init_args"]["encoders"]
    }


def _augment(config: dict) -> None:
    """Random resized crops and flips in training; features of the frozen image encoder can then not be cached."""
    config["data"]["init_args"]["augment"] = True
    _callback(config, "LinearProbeFinetune")["cache_features"] = False


def _only(modality: str) -> Callable[[dict], None]:
    """The recipe on one modality. Where the recipe finetunes no part of that modality's encoder (EfficientNet: it
    stays frozen beside MiniLM), its top two blocks are unfrozen after the probe instead, at the recipe's finetuning LR
    multiplier, with their input served by the activation cache: the recipe's plan, moved to the modality that is
    left (an empty ``unfreeze`` would be refused, as it would never leave the probe)."""
    def change(config: dict) -> None:
        encoders = config["model"]["init_args"]["encoders"]
        config["model"]["init_args"]["encoders"] = {modality: encoders[modality]}
        config["model"]["init_args"]["aux_loss_weight"] = 0.0
        _drop(config, "ModalityBalancer")
        stages = _callback(config, "LinearProbeFinetune")
        unfreeze = [s for s in stages["unfreeze"] if s.split("[")[0] == modality]
        multipliers = {m: v for m, v in stages["lr_multipliers"].items() if m == modality}
        if not unfreeze:
            unfreeze, multipliers = [f"{modality}[-2:]"], {modality: min(stages["lr_multipliers"].values())}
            stages["cache_activations"] = True
        stages["unfreeze"], stages["lr_multipliers"] = unfreeze, multipliers
    return change


TRAINED: dict[str, tuple[str, Callable[[dict], None]]] = {
    "recipe": ("the recipe as shipped: LP-FT stages + warmup/cosine + OGM-GE", lambda config: None),
    "stages_only": ("LP-FT stages + warmup/cosine, no balancing", _balancing(None)),
    "aux": ("stages + unimodal auxiliary losses (weight 1)", _balancing(None, aux=1.0)),
    "mmpareto": ("stages + MMPareto (auxiliary losses, weight 1)", _balancing("mmpareto", aux=1.0)),
    "no_gaussian_dropout": ("the recipe without Gaussian dropout in the head", _no_gaussian_dropout),
    "augment": ("the recipe with random resized crops and flips (no feature cache)", _augment),
    "end_to_end": ("no stages: both encoders finetuned from the first step at 0.1x the head's LR", _end_to_end),
    "text_only": ("the recipe on text alone", _only("text")),
    "image_only": ("the recipe on images alone (EfficientNet's top 2 blocks finetuned)", _only("image")),
}


SEEDED = "seeded 8:1:1"
FOLDS = "Cheema et al. folds"


def _split_label(seed: int, split_dir: str | None) -> str:
    """The ``split`` a result row records: the seeded split, or fold ``seed`` of the published folds."""
    return SEEDED if split_dir is None else f"Cheema et al. fold {seed}"


def _protocol(record: dict[str, Any]) -> str:
    """:data:`SEEDED` or :data:`FOLDS`: a row's split protocol (rows written before ``split`` was recorded: seeded)."""
    return FOLDS if str(record.get("split") or SEEDED).startswith("Cheema") else SEEDED


def _split_args(seed: int, split_dir: str | None) -> dict[str, Any]:
    """The data module's split: seeded 8:1:1 (``split_seed``), or fold ``seed`` of the published folds."""
    return {"split_seed": seed} if split_dir is None else {"split_dir": split_dir, "fold": seed}


def _tag(seed: int, split_dir: str | None) -> str:
    """The row's name suffix for its run directory, config and feature cache: ``seed<N>`` or ``fold<N>``."""
    return f"seed{seed}" if split_dir is None else f"fold{seed}"


def _run_versions(row: str, seed: int, work: Path, split_dir: str | None) -> list[Path]:
    """The row's run directories (``version_N``, oldest first): a resumed run keeps writing into its own."""
    runs = work / "runs" / f"{row}-{_tag(seed, split_dir)}"
    return sorted(runs.glob("version_*"), key=lambda p: int(p.name.split("_")[1]))


def trained_config(
    row: str, root: str, seed: int, work: Path, extra: Sequence[str], split_dir: str | None = None
) -> tuple[Path, list[str]]:
    """The recipe changed for ``row``, written under ``work``; and the CLI arguments that run it."""
    config = yaml.safe_load(RECIPE.read_text())
    TRAINED[row][1](config)
    config["seed_everything"] = seed
    config["data"]["init_args"].update(root=root, **_split_args(seed, split_dir))
    tag = _tag(seed, split_dir)
    for logger in config["trainer"]["logger"]:
        logger["init_args"].update(save_dir=str(work / "runs"), name=f"{row}-{tag}")
    _drop(config, "GradientCheck")
    config["trainer"]["enable_progress_bar"] = False  # the recipe CLI then takes the recipe's RichProgressBar out
    stages = [c for c in _callbacks(config) if c["class_path"].endswith("LinearProbeFinetune")]
    if stages and stages[0]["init_args"].get("cache_features"):
        # Rows of one split seed share the frozen encoders' features (the cache checks the encoders' fingerprints).
        stages[0]["init_args"]["cache_dir"] = str(work / "cache" / tag)
    path = work / "configs" / f"{row}-{tag}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path, ["fit", "-c", str(path), "--trainer.callbacks+=mvsa_single.EpochTimes", *extra]


def unfinished_checkpoint(row: str, seed: int, work: Path, split_dir: str | None = None) -> Path | None:
    """The ``last.ckpt`` of the row's latest run directory, if an earlier attempt left one (a row with a result is not
    run again, so such a checkpoint is that of a run stopped before its result was written: in training, or after
    it, before or during its test)."""
    versions = _run_versions(row, seed, work, split_dir)
    last = versions[-1] / "checkpoints" / "last.ckpt" if versions else None
    return last if last is not None and last.is_file() else None


def run_trained(
    row: str, root: str, seed: int, work: Path, extra: Sequence[str], split_dir: str | None = None, fresh: bool = False
) -> dict[str, Any]:
    """Train and test one row in this process (the child of :func:`main`); the result row. An interrupted attempt's
    ``last.ckpt`` is resumed from (exactly: ``ExactResume`` in the recipe), unless ``fresh``."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    import ml_optim_plugins
    from ml_optim_plugins.cli import run

    config, args = trained_config(row, root, seed, work, extra, split_dir)
    resume = None if fresh else unfinished_checkpoint(row, seed, work, split_dir)
    resumed_at = None
    if resume is not None:
        state = torch.load(resume, map_location="cpu", weights_only=False)
        resumed_at = state["epoch"] + 1
        print(f"{row} seed {seed}: resuming at epoch {resumed_at} from {resume}", flush=True)
        args = [*args, "--ckpt_path", str(resume)]
        if any(s.get("stopped_epoch", 0) > 0 or s.get("wait_count", 0) >= s.get("patience", float("inf"))
               for key, s in state.get("callbacks", {}).items() if key.startswith("EarlyStopping")):
            # Its training had ended by early stopping, its test had not (EarlyStopping would let one more epoch run).
            args = [*args, "--trainer.max_epochs", str(resumed_at)]
    start = time.perf_counter()
    cli = run(args)
    wall = time.perf_counter() - start
    trainer = cli.trainer
    # By name: the CLI imports this file as module "mvsa_single", so its class is not this run's __main__.EpochTimes.
    timer = next(c for c in trainer.callbacks if type(c).__name__ == "EpochTimes")
    # A checkpoint saved before EpochTimes kept its state: the earlier epochs' times and fit time are unknown.
    lost = resumed_at if resumed_at is not None and not timer.fit["resumed_with_times"] else 0
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
    checkpoint = trainer.checkpoint_callback
    test = {m: metrics.get(f"test/{m}") for m in METRICS}
    per_modality = {
        modality: {m: metrics.get(f"test/{modality}/{m}") for m in METRICS}
        for modality in cli.model.encoders
        if f"test/{modality}/acc" in metrics
    }
    return {
        "row": row,
        "what": TRAINED[row][0],
        "seed": seed,
        "split": _split_label(seed, split_dir),
        "test": test,
        "test_per_modality": per_modality,
        "val_f1_selected": None if checkpoint.best_model_score is None else float(checkpoint.best_model_score),
        "selected_checkpoint": Path(checkpoint.best_model_path).name,
        "epochs_run": lost + len(timer.fit["epochs"]),
        "epoch_seconds": [None] * lost + [round(t, 1) for t in timer.fit["epochs"]],
        "epoch_load": [None] * lost + [None if x is None else round(x, 2) for x in timer.fit["loads"]],
        "run_seconds": None if lost else round(wall + timer.fit["earlier_seconds"], 1),
        "resumed_at_epoch": resumed_at,
        "config": str(config),
        "extra_args": list(extra),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "revision": {"library": ml_optim_plugins.__version__,
                     "library_commit": revision(Path(ml_optim_plugins.__file__).parent),
                     "benchmark_commit": revision(REPO)},
    }


def all_post_features(
    root: str, model: Any, modalities: Sequence[str] | None = None
) -> tuple[dict[str, np.ndarray], np.ndarray, list[str]]:
    """Features of every clean post from ``model``'s encoders (evaluation transform), with labels and post IDs;
    only the encoders of ``modalities`` (default: all) run."""
    from torch.utils.data import DataLoader

    from ml_optim_plugins import MVSADataModule
    from ml_optim_plugins.baselines import extract_features

    config = yaml.safe_load(RECIPE.read_text())
    config["data"]["init_args"].update(root=root, val_fraction=0.0, test_fraction=0.0, augment=False)
    data = MVSADataModule(**{k: v for k, v in config["data"]["init_args"].items()})
    data.setup("fit")
    loader = DataLoader(data.datasets["train"], batch_size=data.batch_size, collate_fn=data.collate,
                        num_workers=data.num_workers)
    if modalities is not None:
        keep = set(modalities)
        loader = ({k: v for k, v in batch.items() if k not in model.encoders or k in keep} for batch in loader)
        encoders, model.encoders = model.encoders, type(model.encoders)({k: e for k, e in model.encoders.items() if k in keep})
    try:
        features, labels = extract_features(model, loader)
    finally:
        if modalities is not None:
            model.encoders = encoders
    return features, labels, [row.image.stem for row in data.splits["train"]]


def frozen_features(root: str, work: Path) -> tuple[dict[str, np.ndarray], np.ndarray, list[str]]:
    """Features of every clean post from the recipe's frozen pretrained encoders, cached as ``work/frozen.npz``."""
    cache = work / "frozen.npz"
    if cache.is_file():
        saved = np.load(cache, allow_pickle=False)
        return {k.removeprefix("f_"): saved[k] for k in saved.files if k.startswith("f_")}, saved["labels"], list(saved["ids"])
    features, labels, ids = all_post_features(root, run_config_model(yaml.safe_load(RECIPE.read_text())))
    work.mkdir(parents=True, exist_ok=True)
    np.savez(cache, labels=labels, ids=np.array(ids), **{f"f_{k}": v for k, v in features.items()})
    return features, labels, ids


def _split_parts(
    features: dict[str, np.ndarray], labels: np.ndarray, ids: list[str], root: str, seed: int, split_dir: str | None
) -> dict[str, tuple[dict[str, np.ndarray], np.ndarray]]:
    """``{split: (features, labels)}`` of one split seed (or fold), from the features of every clean post."""
    position = {sample: i for i, sample in enumerate(ids)}
    splits = {split: np.array([position[s] for s in members]) for split, members in split_ids(root, seed, split_dir).items()}
    return {split: ({k: v[index] for k, v in features.items()}, labels[index]) for split, index in splits.items()}


def probe_rows(
    root: str, row: str, seed: int, work: Path, results: Path, split_dir: str | None = None
) -> list[dict[str, Any]]:
    """Each modality's linear probe after training: the elastic net of :func:`frozen_rows` on the features of the
    encoders in ``row``'s selected checkpoint (split seed ``seed``). An encoder whose weights the run left as
    pretrained (frozen throughout) gives exactly the frozen features, which are reused from the cache."""
    import torch

    from ml_optim_plugins import MultimodalClassifier
    from ml_optim_plugins.baselines import fit_baselines

    record = next(r for r in _records(results, split_dir) if r["row"] == row and r["seed"] == seed)
    versions = _run_versions(row, seed, work, split_dir)
    checkpoint = next((v / "checkpoints" / record["selected_checkpoint"] for v in reversed(versions)
                       if (v / "checkpoints" / record["selected_checkpoint"]).is_file()), None)
    if checkpoint is None:
        places = [str(v / "checkpoints") for v in versions] or f"its run directories (none under {work})"
        raise FileNotFoundError(
            f"probe after {row} seed {seed}: its selected checkpoint {record['selected_checkpoint']!r} is in none of "
            f"{places}; "
            "to probe it, train the row again here with another --results file (a row already in --results is skipped)"
        )
    trained = MultimodalClassifier.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=False)
    pretrained = run_config_model(yaml.safe_load(RECIPE.read_text()))
    frozen, labels, ids = frozen_features(root, work)
    changed = [
        name for name, encoder in trained.encoders.items()
        if name not in pretrained.encoders
        or any(not torch.equal(a, b) for a, b in zip(encoder.state_dict().values(), pretrained.encoders[name].state_dict().values()))
    ]
    start = time.perf_counter()
    features = {name: frozen[name] for name in trained.encoders if name not in changed}
    if changed:
        computed, computed_labels, computed_ids = all_post_features(root, trained, changed)
        assert computed_ids == ids and np.array_equal(computed_labels, labels)
        features.update(computed)
    part = _split_parts(features, labels, ids, root, seed, split_dir)
    fitted = fit_baselines(part["train"], part["val"], part["test"], l1_ratios=EN_L1_RATIOS, c_values=EN_C_VALUES)
    seconds = time.perf_counter() - start
    return [
        {"row": f"probe after {row} {result.features}", "what": f"elastic net on the features of {row}'s selected "
         f"checkpoint ({'trained' if set(result.features.split('+')) & set(changed) else 'frozen throughout'})",
         "seed": seed, "split": _split_label(seed, split_dir), "test": result.test, "val": result.val,
         "params": result.params, "checkpoint": checkpoint.name, "trained_encoders": changed,
         "seconds": round(seconds, 1)}
        for result in fitted
        if result.method == "elastic-net"
    ]


def run_config_model(config: dict) -> Any:
    """The recipe's model, built by jsonargparse as the CLI builds it (no Trainer)."""
    from jsonargparse import ArgumentParser

    from ml_optim_plugins import MultimodalClassifier

    parser = ArgumentParser()
    parser.add_subclass_arguments(MultimodalClassifier, "model")
    model_config = copy.deepcopy(config["model"])
    model_config["init_args"].setdefault("num_classes", 3)
    parsed = parser.parse_object({"model": model_config})
    return parser.instantiate_classes(parsed).model


def split_ids(root: str, seed: int, split_dir: str | None = None) -> dict[str, list[str]]:
    """The post IDs of each split of ``MVSADataModule(split_seed=seed)`` (or of fold ``seed`` of ``split_dir``)."""
    from ml_optim_plugins import MVSADataModule

    data = MVSADataModule(root, tokenizer=None, **_split_args(seed, split_dir))
    return {split: [row.image.stem for row in rows] for split, rows in data.splits.items()}


def frozen_rows(
    root: str, seed: int, work: Path, split_dir: str | None = None, baselines: bool = True
) -> list[dict[str, Any]]:
    """Majority class, and (with ``baselines``) k-NN / elastic net on frozen features, for one split seed."""
    from ml_optim_plugins.baselines import fit_baselines

    part = _split_parts(*frozen_features(root, work), root, seed, split_dir)
    majority = Counter(part["train"][1].tolist()).most_common(1)[0][0]
    split = _split_label(seed, split_dir)
    rows = [{"row": "majority", "what": "most frequent training class", "seed": seed, "split": split,
             "test": _scores(part["test"][1], np.full_like(part["test"][1], majority))}]
    if not baselines:
        return rows
    start = time.perf_counter()
    # The library's k-NN grid; a shorter elastic-net grid than `ml-optim-plugins baselines` (saga on 1,664-dim
    # features of 3,609 posts takes minutes a fit on 2 cores): the chosen settings sit inside it (docs/results).
    results = fit_baselines(part["train"], part["val"], part["test"], l1_ratios=EN_L1_RATIOS, c_values=EN_C_VALUES)
    seconds = time.perf_counter() - start
    for result in results:
        rows.append({"row": f"frozen {result.method} {result.features}", "what": "frozen pretrained features",
                     "seed": seed, "split": split, "test": result.test, "val": result.val,
                     "params": result.params,
                     "grid": {"l1_ratio": EN_L1_RATIOS, "C": EN_C_VALUES} if result.method == "elastic-net" else None,
                     "fit_seconds_all_baselines": round(seconds, 1)})
    return rows


def _scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    return {"acc": float(accuracy_score(y_true, y_pred)), "f1": float(f1_score(y_true, y_pred, average="macro")),
            "f1_weighted": float(f1_score(y_true, y_pred, average="weighted"))}


def _records(results: Path, split_dir: str | None = None) -> list[dict[str, Any]]:
    """The rows in ``results`` of this split protocol (seeded, or the folds of ``split_dir``): fold 1 of the published
    folds is not split seed 1."""
    if not results.is_file():
        return []
    protocol = SEEDED if split_dir is None else FOLDS
    records = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    return [record for record in records if _protocol(record) == protocol]


def _done(results: Path, split_dir: str | None = None) -> set[tuple[str, int]]:
    """The (row, seed) pairs already in ``results`` under this split protocol."""
    return {(record["row"], record["seed"]) for record in _records(results, split_dir)}


def _append(results: Path, rows: Sequence[dict[str, Any]]) -> None:
    results.parent.mkdir(parents=True, exist_ok=True)
    with results.open("a") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def _selected_val_f1(record: dict[str, Any]) -> float | None:
    """The validation macro-F1 a row's result was chosen on: a trained row's selected checkpoint, a fitted row's
    chosen hyperparameters (``None`` for a row that selects nothing, such as the majority class)."""
    if record.get("val_f1_selected") is not None:
        return record["val_f1_selected"]
    return (record.get("val") or {}).get("f1")


def _table_rows(paths: Sequence[Path]) -> dict[str, list[dict[str, Any]]]:
    """The result rows of ``paths`` by table row: the row's name, with `` (Cheema et al. folds)`` for fold rows."""
    rows: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for path in paths:
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                suffix = "" if _protocol(record) == SEEDED else f" ({FOLDS})"
                rows[record["row"] + suffix].append(record)
    return rows


def paired(paths: Sequence[Path], against: str = "recipe") -> str:
    """A Markdown table of each row against the row ``against`` on the seeds (same split protocol) both have: the
    mean ± standard deviation of the per-seed differences of test accuracy, macro-F1 and weighted-F1 (the same test
    posts on both sides, so the split's own difficulty cancels) and on how many of those seeds the row's accuracy is
    above, level with or below. Rows sharing no seed with ``against`` are left out."""
    rows = _table_rows(paths)
    lines = [f"| row | seeds shared with {against} | Δ accuracy | Δ macro-F1 | Δ weighted-F1 "
             "| accuracy above / level / below |", "|---|---|---|---|---|---|"]
    for name, records in rows.items():
        # the row of ``against`` under this row's own split protocol (fold rows are paired with fold rows)
        base_name = against + ("" if _protocol(records[0]) == SEEDED else f" ({FOLDS})")
        base = {r["seed"]: r["test"] for r in rows.get(base_name, [])}
        mine = {r["seed"]: r["test"] for r in records if r["seed"] in base}
        if name == base_name or not mine:
            continue
        cells = []
        for metric in METRICS:
            deltas = [100 * (mine[k][metric] - base[k][metric]) for k in sorted(mine)
                      if mine[k].get(metric) is not None and base[k].get(metric) is not None]
            spread = f" ± {statistics.stdev(deltas):.2f}" if len(deltas) > 1 else ""
            cells.append(f"{statistics.mean(deltas):+.2f}{spread}" if deltas else "-")
        signs = [round(100 * (mine[k]["acc"] - base[k]["acc"]), 2) for k in mine]
        tally = f"{sum(d > 0 for d in signs)} / {sum(d == 0 for d in signs)} / {sum(d < 0 for d in signs)}"
        lines.append(f"| {name} | {','.join(map(str, sorted(mine)))} | {' | '.join(cells)} | {tally} |")
    return "\n".join(lines)


def summarize(paths: Sequence[Path]) -> str:
    """A Markdown table: per row, mean ± standard deviation over seeds of test accuracy, macro-F1, weighted-F1 (the
    value alone for a row with one seed; ``(n=K)`` where only K of a row's seeds have the metric), and the validation
    macro-F1 the row was selected on, beside them so that a gap between validation and test shows; then the mean
    training epoch's seconds, the machine's mean 1-minute load average at the epochs' ends (where recorded: a time
    taken beside other jobs shows as a load above the row's own threads) and the mean run's seconds."""
    rows = _table_rows(paths)

    def cell(values: list[float], seeds: int) -> str:
        if not values:
            return "-"
        fewer = f" (n={len(values)})" if len(values) < seeds else ""  # a metric that some seeds' records lack
        if len(values) == 1:  # one seed: no spread to state
            return f"{100 * values[0]:.2f}{fewer}"
        return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}{fewer}"

    lines = ["| row | seeds | test accuracy | test macro-F1 | test weighted-F1 | val macro-F1 (selected) "
             "| s / train epoch | load / epoch | s / run |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, records in rows.items():
        seeds = ",".join(str(r["seed"]) for r in sorted(records, key=lambda r: r["seed"]))
        scores = [cell([r["test"][m] for r in records if r["test"].get(m) is not None], len(records)) for m in METRICS]
        scores.append(cell([v for v in map(_selected_val_f1, records) if v is not None], len(records)))
        epochs, loads = ([x for r in records for x in r.get(key, []) if x is not None]
                         for key in ("epoch_seconds", "epoch_load"))
        runs = [r["run_seconds"] for r in records if r.get("run_seconds") is not None]
        costs = [f"{statistics.mean(values):{spec}}" if values else "-"
                 for values, spec in ((epochs, ".0f"), (loads, ".1f"), (runs, ".0f"))]
        lines.append(f"| {name} | {seeds} | {' | '.join(scores)} | {' | '.join(costs)} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", help="the MVSA-Single root (benchmarks/mvsa_assemble.py writes one)")
    parser.add_argument("--results", type=Path, default=REPO / "docs" / "results" / "mvsa_single.jsonl")
    parser.add_argument("--work", type=Path, default=Path("runs") / "mvsa_single_benchmark")
    parser.add_argument("--rows", nargs="+", default=["majority", "frozen", *TRAINED])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--split-dir", help="the published folds of Cheema et al. (valid_pairlist.txt, splits/): "
                        "--seeds are then fold numbers (1-10)")
    parser.add_argument("--summarize", nargs="+", type=Path)
    parser.add_argument("--against", metavar="ROW", help="with --summarize: each row paired by seed against ROW "
                        "(differences of its test figures on the same test posts) instead of the summary table")
    parser.add_argument("--probe", nargs="+", metavar="ROW", help="each modality's linear probe after training, for "
                        "these trained rows' finished runs of --seeds (rows 'probe after ROW FEATURES')")
    parser.add_argument("--fresh", action="store_true", help="start interrupted rows again from epoch 0 instead of "
                        "resuming them from their last.ckpt")
    parser.add_argument("--child", nargs=2, metavar=("ROW", "SEED"), help=argparse.SUPPRESS)
    parser.add_argument("extra", nargs="*", help="after --: CLI overrides for every trained row")
    args = parser.parse_args(argv)
    if args.against and not args.summarize:
        parser.error("--against pairs the rows of --summarize's files: give --summarize too")
    if args.summarize:
        print(summarize(args.summarize) if args.against is None else paired(args.summarize, args.against))
        return
    if args.root is None:
        parser.error("--root is required")
    if args.child:
        # This process's own flags are parsed; left in sys.argv, LightningCLI would warn that it got both them and args.
        sys.argv = sys.argv[:1]
        row = run_trained(args.child[0], args.root, int(args.child[1]), args.work, args.extra, args.split_dir,
                          args.fresh)
        _append(args.results, [row])
        return
    if args.probe:
        failed = []
        for row in args.probe:
            for seed in args.seeds:
                done = _done(args.results, args.split_dir)
                if any(name.startswith(f"probe after {row} ") and s == seed for name, s in done):
                    continue  # probed already (a one-modality row has one probe row)
                if (row, seed) not in done:
                    print(f"probe after {row} seed {seed}: no finished run in {args.results}, skipped", flush=True)
                    continue
                try:
                    rows = probe_rows(args.root, row, seed, args.work, args.results, args.split_dir)
                except FileNotFoundError as error:  # its checkpoint is gone; the other probes still run
                    print(f"{error}; going on with the next probe", flush=True)
                    failed.append(f"probe after {row} seed {seed}")
                    continue
                _append(args.results, rows)
                print(f"probe after {row} seed {seed}: rows written to {args.results}", flush=True)
        if failed:
            sys.exit(f"{len(failed)} probe(s) failed: {', '.join(failed)}")
        return
    unknown = sorted(set(args.rows) - {"majority", "frozen", *TRAINED})
    if unknown:
        parser.error(f"unknown rows {unknown}; rows are majority, frozen, {', '.join(TRAINED)}")
    for seed in args.seeds:
        finished = _done(args.results, args.split_dir)
        done = {"frozen" if name.startswith("frozen ") else name for name, s in finished if s == seed}
        wanted = [r for r in ("majority", "frozen") if r in args.rows and r not in done]
        if wanted:
            rows = frozen_rows(args.root, seed, args.work, args.split_dir, baselines="frozen" in wanted)
            _append(args.results, [r for r in rows if r["row"] != "majority" or "majority" in wanted])
            print(f"seed {seed}: {' and '.join(wanted)} rows written to {args.results}", flush=True)
    failed = []
    for row in [r for r in args.rows if r in TRAINED]:
        for seed in args.seeds:
            if (row, seed) in _done(args.results, args.split_dir):
                print(f"{row} seed {seed}: already in {args.results}, skipped", flush=True)
                continue
            print(f"{row} seed {seed}: training", flush=True)
            command = [sys.executable, str(Path(__file__).resolve()), "--root", args.root, "--results", str(args.results),
                       "--work", str(args.work), "--child", row, str(seed),
                       *(["--split-dir", args.split_dir] if args.split_dir else []),
                       *(["--fresh"] if args.fresh else []), "--", *args.extra]
            # The CLI imports this file as module mvsa_single (EpochTimes); the caller's own PYTHONPATH is kept.
            path = os.pathsep.join(p for p in (str(Path(__file__).parent), os.environ.get("PYTHONPATH")) if p)
            code = subprocess.run(command, cwd=REPO, env={**os.environ, "PYTHONPATH": path})
            if code.returncode != 0:  # the child printed why; the other rows still run
                print(f"{row} seed {seed}: FAILED (exit {code.returncode}); going on with the next row", flush=True)
                failed.append(f"{row} seed {seed}")
    if failed:
        sys.exit(f"{len(failed)} row(s) failed: {', '.join(failed)}; rerun them once fixed (finished rows are skipped)")


if __name__ == "__main__":
    main()
