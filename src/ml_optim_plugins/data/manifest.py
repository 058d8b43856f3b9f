"""Real image + text data from a manifest file (CSV or JSONL: image path, text, label per row)."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ml_optim_plugins.data.base import MultimodalDataModule
from ml_optim_plugins.data.transforms import image_data_config, image_transform


class ManifestError(ValueError):
    """A manifest has bad rows or columns; ``problems`` lists ``(file, line, message)`` for each."""

    def __init__(self, problems: Sequence[tuple[str, int, str]]) -> None:
        self.problems = list(problems)
        shown = "\n".join(f"  {file}, line {line}: {message}" for file, line, message in self.problems[:20])
        more = f"\n  ... and {len(self.problems) - 20} more" if len(self.problems) > 20 else ""
        super().__init__(
            f"{len(self.problems)} bad row(s) in the manifest:\n{shown}{more}\n"
            "Fix them, or pass on_bad_rows='skip' to leave them out."
        )


@dataclass(frozen=True)
class ManifestRow:
    """One sample of a manifest: where it came from, the image file, the text and the label name.

    ``problem`` is why the reader could not use the line (a malformed line, a missing text file), ``""`` when it read
    fine; :func:`row_problem` reports it like any other bad row.
    """

    file: str
    line: int
    image: Path
    text: str
    label: str
    problem: str = ""


def read_manifest(
    path: str | Path, image_column: str, text_column: str, label_column: str, image_root: str | Path | None = None
) -> list[ManifestRow]:
    """Read a CSV (``.csv``, ``.tsv``) or JSONL (``.jsonl``, ``.ndjson``) manifest into rows.

    Relative image paths are resolved against ``image_root`` (default: the manifest's folder). ``line`` is the
    1-based line of the file (the CSV header is line 1).

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: for an unknown suffix, missing columns, or a line that is not a JSON object.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {str(path)!r} does not exist")
    root = Path(image_root) if image_root is not None else path.parent
    columns = (image_column, text_column, label_column)
    suffix = path.suffix.lower()
    records: list[tuple[int, dict[str, Any]]] = []
    if suffix in (".csv", ".tsv"):
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ",")
            absent = [c for c in columns if c not in (reader.fieldnames or [])]
            if absent:
                raise ValueError(
                    f"manifest {str(path)!r} lacks column(s) {absent}; its columns are {reader.fieldnames}. "
                    "Set image_column / text_column / label_column to match."
                )
            records = [(reader.line_num, record) for record in reader]
    elif suffix in (".jsonl", ".ndjson"):
        with path.open(encoding="utf-8") as handle:
            for number, raw in enumerate(handle, start=1):
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}, line {number}: not valid JSON ({err.msg})") from err
                if not isinstance(record, dict):
                    raise ValueError(f"{path}, line {number}: expected a JSON object, got {type(record).__name__}")
                records.append((number, record))
    else:
        raise ValueError(f"manifest {str(path)!r}: unknown format {suffix!r}; use .csv, .tsv, .jsonl or .ndjson")
    rows = []
    for number, record in records:
        image = str(record.get(image_column) or "")
        rows.append(
            ManifestRow(
                file=str(path),
                line=number,
                image=(root / image) if image else Path(),
                text=str(record.get(text_column) or "").strip(),
                label=str(record.get(label_column) if record.get(label_column) is not None else "").strip(),
            )
        )
    return rows


def row_problem(row: ManifestRow, known_labels: set[str] | None) -> str | None:
    """Why ``row`` cannot be used (a reading problem, missing or unreadable image, empty text, unknown label), or
    ``None``."""
    if row.problem:
        return row.problem
    if not row.label:
        return "empty label"
    if known_labels is not None and row.label not in known_labels:
        return f"unknown label {row.label!r}; known labels are {sorted(known_labels)}"
    if not row.text:
        return "empty text"
    if row.image == Path():
        return "empty image path"
    if not row.image.is_file():
        return f"image {str(row.image)!r} not found"
    try:
        with Image.open(row.image) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        return f"image {str(row.image)!r} is unreadable ({err})"
    return None


def seeded_split(size: int, val_fraction: float, test_fraction: float, seed: int) -> dict[str, list[int]]:
    """Positions ``0 .. size - 1`` split at random (seeded) into ``"val"``, ``"test"`` and the rest, ``"train"``.

    With both fractions 0, ``"train"`` keeps the original order.

    Example:
        >>> {name: len(positions) for name, positions in seeded_split(10, 0.2, 0.1, seed=0).items()}
        {'val': 2, 'test': 1, 'train': 7}
    """
    n_val, n_test = int(round(val_fraction * size)), int(round(test_fraction * size))
    if not (n_val or n_test):
        return {"val": [], "test": [], "train": list(range(size))}
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()
    return {"val": order[:n_val], "test": order[n_val : n_val + n_test], "train": order[n_val + n_test :]}


def _sorted_labels(labels: set[str]) -> list[str]:
    return sorted(labels, key=int) if all(label.lstrip("-").isdigit() for label in labels) else sorted(labels)


class ManifestDataset(Dataset):
    """Loads the image of each row, applies ``transform``, and returns ``{"image", "text", "label", "index"}``
    (``index``: the row's position, the sample id of feature caches).

    ``draft_size``: JPEGs are decoded at the smallest of 1/1, 1/2, 1/4, 1/8 scale whose sides stay at least this
    large (PIL's ``draft``); ``None`` decodes at full resolution."""

    def __init__(
        self, rows: Sequence[ManifestRow], label_ids: dict[str, int], transform: Any, draft_size: int | None = None
    ) -> None:
        self.rows = list(rows)
        self.label_ids = label_ids
        self.transform = transform
        self.draft_size = draft_size

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.rows[index]
        with Image.open(row.image) as image:
            if self.draft_size:
                # JPEG: let the decoder scale by 1/2, 1/4 or 1/8 while staying above the size the transform needs;
                # a full-resolution decode of a phone photo costs more than the encoder's forward pass.
                image.draft("RGB", (self.draft_size, self.draft_size))
            pixels = self.transform(image.convert("RGB"))
        return {"image": pixels, "text": row.text, "label": self.label_ids[row.label], "index": index}


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
        on_bad_rows: ``"raise"`` or ``"skip"``.
        image_model: the image encoder's timm architecture; its data config (input size, interpolation, mean, std,
            crop) makes the image transforms (:func:`~ml_optim_plugins.data.transforms.image_data_config`). ``None``:
            timm's ImageNet defaults.
        image_size: side of the square crops given to the image encoder; ``None``: the architecture's input size.
        augment: random resized crops and flips in training.
        batch_size: samples per batch.
        num_workers: DataLoader worker processes.
        tokenizer: text model whose tokenizer to use; ``None`` keeps raw strings.
        max_length: longest tokenised text.

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
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, tokenizer=tokenizer, max_length=max_length)
        if on_bad_rows not in ("raise", "skip"):
            raise ValueError(f"on_bad_rows={on_bad_rows!r}; expected 'raise' or 'skip'")
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name}={value} must be in [0, 1)")
        if val is None and test is None and val_fraction + test_fraction >= 1.0:
            raise ValueError(f"val_fraction + test_fraction = {val_fraction + test_fraction} leaves no training data")
        if labels is not None and len(set(labels)) != len(labels):
            raise ValueError(f"labels {list(labels)} contain duplicates")
        self.save_hyperparameters()
        self.image_config = image_data_config(image_model, image_size)
        self.columns = (image_column, text_column, label_column)
        self.image_root = image_root
        self.on_bad_rows = on_bad_rows
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
        known = set(labels) if labels is not None else {row.label for row in read["train"] if row.label}
        problems: list[tuple[str, int, str]] = []
        for name in read:
            good = []
            for row in read[name]:
                problem = row_problem(row, known)
                if problem is None:
                    good.append(row)
                else:
                    problems.append((row.file, row.line, problem))
            read[name] = good
        if problems:
            if self.on_bad_rows == "raise":
                raise ManifestError(problems)
            self.skipped_rows = problems
            rank_zero_warn(f"{type(self).__name__} skipped {len(problems)} bad row(s); see .skipped_rows. First: {problems[0]}")
        positions = seeded_split(
            len(read["train"]),
            0.0 if "val" in read else val_fraction,
            0.0 if "test" in read else test_fraction,
            seed,
        )
        splits = {name: read.get(name) or [read["train"][i] for i in positions[name]] for name in ("val", "test")}
        splits["train"] = [read["train"][i] for i in positions["train"]]
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
            split: ManifestDataset(rows, label_ids, self.transform(train=split == "train"), self._draft_size())
            for split, rows in self.splits.items()
            if rows
        }
        self._save_to_log_dir("labels.json", self._class_names, "label names")

    def _draft_size(self) -> int:
        """The smallest decoded side the transforms need: the evaluation resize (input size / crop_pct)."""
        side = max(self.image_config["input_size"][1:])
        return int(side / (self.image_config.get("crop_pct") or 1.0)) + 1

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
