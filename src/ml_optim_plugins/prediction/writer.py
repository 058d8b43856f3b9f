"""PredictionWriter: Lightning's prediction-writer callback that writes ``predictions.csv``, in input order, once per
sample, also under DDP."""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from ml_optim_plugins.data.base import MultimodalDataModule
from ml_optim_plugins.prediction.checkpoint import checkpoint_mismatches


def class_names_of(module: pl.LightningModule, datamodule: Any = None) -> list[str]:
    """The class names a prediction is reported with: the model's ``class_names`` (those it was trained with), else
    the data module's, else the class ids ``"0"``, ``"1"``, ..."""
    names = getattr(module, "class_names", None) or getattr(datamodule, "class_names", None)
    if names:
        return [str(name) for name in names]
    if getattr(module, "num_classes", None) is None:
        raise ValueError(f"{type(module).__name__} has neither class_names nor num_classes; give it one of them")
    return [str(i) for i in range(int(module.num_classes))]


def prediction_columns(class_names: Sequence[str], modalities: Sequence[str]) -> list[str]:
    """The columns of ``predictions.csv``: ``id``, ``prediction``, ``prob_<class>`` per class, and
    ``<modality>_prediction`` per modality.

    Example:
        >>> prediction_columns(["negative", "positive"], ["image"])
        ['id', 'prediction', 'prob_negative', 'prob_positive', 'image_prediction']
    """
    return ["id", "prediction", *(f"prob_{name}" for name in class_names), *(f"{m}_prediction" for m in modalities)]


class PredictionWriter(BasePredictionWriter):
    """Write the predictions of ``trainer.predict`` to a CSV file: one row per sample, in input order.

    Each row holds the sample's id (the ``ids`` of the predict dataset, e.g. a manifest's id column; else the
    sample's position), the predicted class by name, the probability of every class (``prob_<class>``) and, with
    ``modality_predictions``, what each modality alone predicts (``<modality>_prediction``). With one of the
    library's data modules, a model whose ``class_names`` or ``preprocessing`` differ from the data's is refused at
    ``setup``.

    It collects each batch's outputs (``predict_step`` must return ``probs``, ``index`` and, for the per-modality
    columns, ``modality_probs``, as :class:`~ml_optim_plugins.MultimodalClassifier`'s does). At the end of the epoch the
    processes' outputs are gathered (under DDP), ordered by sample index, a sample met twice (a sampler that pads
    with repeats) is written once, and rank 0 writes the file. ``ml-optim-plugins predict`` adds one when the config
    has no prediction writer.

    Args:
        output: the CSV file; ``None``: ``predictions.csv`` in the run's log directory (``trainer.log_dir``).
        modality_predictions: add each modality's own prediction.
        decimals: decimals of the probabilities.

    Example::

        trainer = Trainer(callbacks=[PredictionWriter("predictions.csv")])
        trainer.predict(model, datamodule=SyntheticSentimentDataModule(predict="posts.csv"), return_predictions=False)
    """

    def __init__(self, output: str | Path | None = None, modality_predictions: bool = True, decimals: int = 6) -> None:
        super().__init__(write_interval="batch_and_epoch")
        if decimals < 1:
            raise ValueError(f"decimals={decimals} must be >= 1")
        self.output = None if output is None else Path(output)
        self.modality_predictions = modality_predictions
        self.decimals = decimals
        #: The file written by the last ``predict`` (rank 0), and its number of rows.
        self.path: Path | None = None
        self.count = 0
        self._rows: list[Tensor] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._rows = []
        data = trainer.datamodule
        if stage == "predict" and isinstance(data, MultimodalDataModule):
            # A model trained on other labels or other preprocessing would be silently wrong, e.g. a Predictor's
            # model (the checkpoint's names and preprocessing) given another recipe's data module.
            saved = {"class_names": getattr(pl_module, "class_names", None),
                     "preprocessing": getattr(pl_module, "preprocessing", None)}
            problems = checkpoint_mismatches(saved, data, source="the model")
            if problems:
                raise ValueError(
                    f"{type(pl_module).__name__} does not fit the data it is asked to predict on "
                    f"({type(data).__name__}): {'; '.join(problems)}"
                )
            # Lightning skips the predict loop, hooks included, of a process whose share of the inputs is empty; the
            # others would wait for it in the gather forever.
            inputs = len(data.datasets.get("predict", ()))
            if 0 < inputs < trainer.world_size:
                raise ValueError(
                    f"{inputs} input(s) to predict on for {trainer.world_size} processes: a process without inputs "
                    f"would never join the others; predict on at most {inputs} device(s) (--trainer.devices {inputs})"
                )

    def _modalities(self, pl_module: pl.LightningModule) -> list[str]:
        if not self.modality_predictions or not callable(getattr(pl_module, "modality_encoders", None)):
            return []
        return list(pl_module.modality_encoders())

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        if dataloader_idx != 0:
            raise ValueError(f"PredictionWriter writes the predictions of one dataloader; got dataloader {dataloader_idx}")
        if not isinstance(prediction, Mapping) or "probs" not in prediction or "index" not in prediction:
            raise ValueError(
                "PredictionWriter needs predict_step to return {'probs': (batch, classes), 'index': (batch,) sample "
                f"positions, 'modality_probs': {{modality: (batch, classes)}}}}; got {type(prediction).__name__}"
                + (f" with keys {sorted(prediction)}" if isinstance(prediction, Mapping) else "")
            )
        modality_probs = prediction.get("modality_probs", {})
        missing = [m for m in self._modalities(pl_module) if m not in modality_probs]
        if missing:
            raise ValueError(f"predict_step returned no modality_probs for {missing}; pass modality_predictions=False")
        # One float64 row per sample: its index (exact up to 2**53), the class probabilities, each modality's.
        columns = [prediction["index"].reshape(-1, 1), prediction["probs"]]
        columns += [modality_probs[m] for m in self._modalities(pl_module)]
        self._rows.append(torch.cat([c.detach().to(torch.float64) for c in columns], dim=1).cpu())

    def write_on_epoch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, predictions: Sequence[Any], batch_indices: Sequence[Any]
    ) -> None:
        names, modalities = class_names_of(pl_module, trainer.datamodule), self._modalities(pl_module)
        width = 1 + len(names) * (1 + len(modalities))
        local = torch.cat(self._rows) if self._rows else torch.zeros(0, width, dtype=torch.float64)
        self._rows = []
        rows = gather_rows(trainer, local)
        log_dir = trainer.log_dir  # a collective under DDP: every rank asks
        if not trainer.is_global_zero:
            return
        rows = rows[torch.argsort(rows[:, 0], stable=True)]
        if len(rows):  # a sample met twice (a sampler padded with repeats) is written once
            rows = rows[torch.cat([torch.tensor([True]), rows[1:, 0] != rows[:-1, 0]])]
        path = self.output if self.output is not None else Path(log_dir or ".") / "predictions.csv"
        ids = prediction_ids(trainer)
        self.path, self.count = path, len(rows)
        path.parent.mkdir(parents=True, exist_ok=True)
        classes = len(names)
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(prediction_columns(names, modalities))
            for row in rows.tolist():
                index, probs = int(row[0]), row[1 : 1 + classes]
                modality_probs = [row[1 + classes * (i + 1) : 1 + classes * (i + 2)] for i in range(len(modalities))]
                writer.writerow([
                    ids[index] if ids is not None else index,
                    names[max(range(classes), key=probs.__getitem__)],
                    *(f"{p:.{self.decimals}f}" for p in probs),
                    *(names[max(range(classes), key=m.__getitem__)] for m in modality_probs),
                ])
        rank_zero_info(f"PredictionWriter: {len(rows)} prediction(s) written to {path}")


def gather_rows(trainer: pl.Trainer, rows: Tensor) -> Tensor:
    """The ``rows`` of every process, concatenated (rank 0's first); the processes may hold different numbers."""
    if trainer.world_size == 1:
        return rows
    strategy = trainer.strategy
    device = strategy.root_device
    counts = strategy.all_gather(torch.tensor([len(rows)], device=device)).reshape(-1).tolist()
    padded = torch.zeros(max(counts), rows.shape[1], dtype=rows.dtype, device=device)
    padded[: len(rows)] = rows.to(device)
    gathered = strategy.all_gather(padded).cpu()
    return torch.cat([gathered[rank, :count] for rank, count in enumerate(counts)])


def prediction_ids(trainer: pl.Trainer) -> list[str] | None:
    """The ``ids`` of the dataset of ``trainer.predict_dataloaders`` (one dataloader), or ``None``."""
    loaders = trainer.predict_dataloaders
    loader = loaders[0] if isinstance(loaders, (list, tuple)) and loaders else loaders
    ids = getattr(getattr(loader, "dataset", None), "ids", None)
    return None if ids is None else list(ids)
