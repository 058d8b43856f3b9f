"""Real image + text data from a manifest file (CSV or JSONL: image path, text, label per row)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from ml_optim_plugins.data.base import MultimodalDataModule
from ml_optim_plugins.data.checks import check_images, default_check_cache, duplicate_groups, label_spelling_conflicts
from ml_optim_plugins.data.rows import (
    ManifestDataset,
    ManifestError,
    ManifestRow,
    partition_rows,
    read_manifest,
    row_problem,  # noqa: F401 - imported from here by benchmarks/mvsa_assemble.py
    seeded_split,
)
from ml_optim_plugins.data.transforms import image_data_config, image_transform
from ml_optim_plugins.hyperparameters import check_number


def _sorted_labels(labels: set[str]) -> list[str]:
    return sorted(labels, key=int) if all(label.lstrip("-").isdigit() for label in labels) else sorted(labels)


class ManifestDataModule(MultimodalDataModule):
    """Image + text classification data listed in CSV / JSONL manifests.

    Every row names an image file, a text and a label (column names configurable). Validation, test splits come
    from their own manifests, or from a seeded split of the training manifest. Label names map to class ids in a fixed
    order (``labels``, or sorted names of the training rows); they are saved in the checkpoint (``state_dict``) and
    as ``labels.json`` in the run's log directory.

    Rows are checked before training: a missing or unreadable image, an empty text, or an unknown label is reported
    with its file and line. By default the first check raises :class:`ManifestError` listing all bad rows;
    ``on_bad_rows="skip"`` leaves them out and warns with their count.

    Args:
        train: training manifest (``.csv``, ``.tsv``, ``.jsonl``).
        val: validation manifest; ``None`` splits ``val_fraction`` off ``train``.
        test: test manifest; ``None`` splits ``test_fraction`` off ``train`` (no test split when 0).
        val_fraction: share of ``train`` used for validation when ``val`` is not given.
        test_fraction: share of ``train`` used for testing when ``test`` is not given.
        split_seed: seed of that split.
        image_column: column of the image paths (relative to ``image_root`` or the manifest's folder).
        text_column: column of the texts.
        label_column: column of the labels.
        image_root: folder that relative image paths start from.
        labels: class names in id order; default: the sorted names found in ``train``.
        on_bad_rows: ``"raise"`` or ``"skip"`` (for the rows to train on and those to predict on).
        image_model: the image encoder's timm architecture; its data config (input size, interpolation, mean, std,
            crop) makes the image transforms (:func:`~ml_optim_plugins.data.transforms.image_data_config`). ``None``:
            timm's ImageNet defaults.
        image_size: side of the square crops given to the image encoder; ``None``: the architecture's input size.
        augment: random resized crops and flips in training.
        batch_size: samples per batch.
        num_workers: DataLoader worker processes.
        tokenizer: text model whose tokenizer to use; ``None`` keeps raw strings.
        max_length: longest tokenised text.
        predict: inputs to predict on (a manifest with ``image_column``, ``text_column`` and optionally ``id``, an
            MVSA root, or a folder of ``<id>.jpg`` + ``<id>.txt``; see :class:`~ml_optim_plugins.MultimodalDataModule`).

    Example:
        >>> dm = ManifestDataModule("data/train.csv", val="data/val.csv", labels=["negative", "neutral", "positive"])
        ... # doctest: +SKIP
    """

    def __init__(
        self,
        train: str,
        val: str | None = None,
        test: str | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.0,
        split_seed: int = 0,
        image_column: str = "image",
        text_column: str = "text",
        label_column: str = "label",
        image_root: str | None = None,
        labels: Sequence[str] | None = None,
        on_bad_rows: Literal["raise", "skip"] = "raise",
        image_model: str | None = None,
        image_size: int | None = None,
        augment: bool = True,
        batch_size: int = 32,
        num_workers: int = 0,
        tokenizer: str | None = "all-MiniLM-L6-v2",
        max_length: int = 64,
        predict: str | None = None,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            tokenizer=tokenizer,
            max_length=max_length,
            predict=predict,
            on_bad_rows=on_bad_rows,
        )
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            check_number(name, value, at_least=0, below=1)
        if val is None and test is None and val_fraction + test_fraction >= 1.0:
            raise ValueError(f"val_fraction + test_fraction = {val_fraction + test_fraction} leaves no training data")
        if labels is not None and len(set(labels)) != len(labels):
            raise ValueError(f"labels {list(labels)} contain duplicates")
        self.save_hyperparameters()
        self.image_config = image_data_config(image_model, image_size)
        self.columns = (image_column, text_column, label_column)
        self.image_root = image_root
        self.skipped_rows: list[tuple[str, int, str]] = []
        self.manifests = {"train": train, "val": val, "test": test}
        self.splits = self._load(val_fraction, test_fraction, split_seed, labels)
        self._class_names = list(labels) if labels is not None else _sorted_labels({r.label for r in self.splits["train"]})
        if len(self._class_names) < 2:
            raise ValueError(f"the training manifest has {len(self._class_names)} label(s); a classifier needs 2 or more")

    def read_rows(self) -> dict[str, list[ManifestRow]]:
        """The rows of ``"train"``, and of ``"val"`` / ``"test"`` where they have their own manifest, unchecked.

        A subclass that reads another layout overrides this; checking, splitting and label mapping stay the same.
        """
        return {
            name: read_manifest(path, *self.columns, self.image_root) for name, path in self.manifests.items() if path
        }

    def _load(
        self, val_fraction: float, test_fraction: float, seed: int, labels: Sequence[str] | None
    ) -> dict[str, list[ManifestRow]]:
        read = self.read_rows()
        conflicts = label_spelling_conflicts([(row.label, row.file, row.line) for rows in read.values() for row in rows])
        if conflicts:
            raise ValueError(
                "labels spelt more than one way would become separate classes: " + "; ".join(conflicts[:10])
                + ". Use one spelling per class in the manifest"
            )
        known = set(labels) if labels is not None else {row.label for row in read["train"] if row.label}
        images = check_images(
            [row.image for rows in read.values() for row in rows if not row.problem and row.image != Path()],
            cache_file=default_check_cache(),
        )
        problems: list[tuple[str, int, str]] = []
        for name in read:
            read[name], bad = partition_rows(read[name], known, images)
            problems += bad
        groups = duplicate_groups([(str(row.image), row.text) for row in read["train"]])
        for group in groups:
            first = read["train"][group[0]]
            problems += [
                (row.file, row.line, f"same image and text as line {first.line}, but label {row.label!r} there "
                 f"{first.label!r}")
                for row in (read["train"][i] for i in group[1:]) if row.label != first.label
            ]
        if problems:
            self.skipped_rows = self.handle_bad_rows(problems, "skipped_rows")
            bad = {(file, line) for file, line, _ in problems}
            read["train"] = [row for row in read["train"] if (row.file, row.line) not in bad]
            groups = duplicate_groups([(str(row.image), row.text) for row in read["train"]])
        repeats = [group for group in groups if len(group) > 1]
        if repeats:
            first = [read["train"][i].line for i in repeats[0][:2]]
            rank_zero_warn(
                f"{type(self).__name__}: {sum(len(g) - 1 for g in repeats)} row(s) repeat the image and text of an "
                f"earlier row (first: line {first[1]} repeats line {first[0]}); each set of repeats is kept in one split"
            )
        # Split groups of identical rows, not rows, so that no sample is both trained and tested on; without repeats
        # every group is one row and the split is the plain seeded split of the rows.
        positions = seeded_split(
            len(groups),
            0.0 if "val" in read else val_fraction,
            0.0 if "test" in read else test_fraction,
            seed,
        )
        members = {name: [read["train"][i] for g in positions[name] for i in groups[g]] for name in positions}
        splits = {name: read.get(name) or members[name] for name in ("val", "test")}
        splits["train"] = members["train"]
        if not splits["train"]:
            raise ValueError(f"no usable training rows in {self.manifests['train']!r}")
        return splits

    @property
    def class_names(self) -> Sequence[str]:
        return self._class_names

    def transform(self, train: bool) -> Any:
        """The image transform of the training (augmented) or evaluation pipeline, from :attr:`image_config`."""
        return image_transform(self.image_config, train=train, augment=self.hparams.augment)

    def setup(self, stage: str) -> None:
        label_ids = {name: index for index, name in enumerate(self._class_names)}
        self.datasets = {
            split: ManifestDataset(rows, label_ids, self.transform(train=split == "train"))
            for split, rows in self.splits.items()
            if rows
        }
        self._save_to_log_dir("labels.json", self._class_names, "label names")
        super().setup(stage)

    @property
    def input_columns(self) -> tuple[str, str]:
        return self.columns[0], self.columns[1]

    def _save_to_log_dir(self, name: str, content: Any, what: str) -> None:
        """Write ``content`` as JSON file ``name`` into the run's log directory (rank 0; nothing without a Trainer or
        without loggers)."""
        trainer = self.trainer
        if trainer is None or not trainer.loggers:
            return  # no run directory (a Trainer without loggers would point log_dir at the working directory)
        log_dir = trainer.log_dir  # on every rank: it broadcasts rank 0's directory
        if trainer.is_global_zero and log_dir is not None:
            out = Path(log_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / name).write_text(json.dumps(content, indent=2))
            rank_zero_info(f"{what} saved to {out / name}")

    def state_dict(self) -> dict[str, Any]:
        return {"class_names": list(self._class_names)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = list(state_dict.get("class_names", []))
        if saved and saved != list(self._class_names):
            raise ValueError(
                f"the checkpoint was trained with labels {saved}, but this data has {list(self._class_names)}; "
                "pass labels=... in the checkpoint's order"
            )
