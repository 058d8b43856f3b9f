"""Rows of a manifest: reading CSV / JSONL files (file and line kept), checking each row, the seeded split, and the
dataset that loads their images."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from ml_optim_plugins.data.checks import image_problem


class ManifestError(ValueError):
    """A manifest has bad rows or columns; ``problems`` lists ``(file, line, message)`` for each."""

    def __init__(self, problems: Sequence[tuple[str, int, str]]) -> None:
        self.problems = list(problems)
        # A row of a folder (an <id>.jpg + <id>.txt pair) has no line: line 0.
        shown = "\n".join(
            f"  {file}{f', line {line}' if line > 0 else ''}: {message}" for file, line, message in self.problems[:20]
        )
        more = f"\n  ... and {len(self.problems) - 20} more" if len(self.problems) > 20 else ""
        super().__init__(
            f"{len(self.problems)} bad row(s) in the manifest:\n{shown}{more}\n"
            "Fix them, or pass on_bad_rows='skip' to leave them out."
        )


@dataclass(frozen=True)
class ManifestRow:
    """One sample of a manifest: where it came from, the image file, the text and the label name.

    ``problem`` is why the reader could not use the line (a malformed line, a missing text file), ``""`` when it read
    fine; :func:`row_problem` reports it like any other bad row. ``sample_id`` is the row's own id where the input
    has one (a manifest's id column, the ``<id>`` of an ``<id>.jpg`` file), ``""`` otherwise.
    """

    file: str
    line: int
    image: Path
    text: str
    label: str
    problem: str = ""
    sample_id: str = ""


class ManifestDataset(Dataset):
    """Loads the image of each row, applies ``transform``, and returns ``{"image", "text", "label", "index"}``
    (``index``: the row's position, the sample id of feature caches and of predictions).

    With ``label_ids=None`` the rows are inputs to predict on: samples have no ``"label"``, and :attr:`ids` names them.
    """

    def __init__(self, rows: Sequence[ManifestRow], label_ids: Mapping[str, int] | None, transform: Any) -> None:
        self.rows = list(rows)
        self.label_ids = label_ids
        self.transform = transform

    @property
    def ids(self) -> list[str]:
        """Each row's ``sample_id``, or its image path where it has none."""
        return [row.sample_id or str(row.image) for row in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.rows[index]
        try:
            with Image.open(row.image) as image:
                pixels = self.transform(image.convert("RGB"))
        except Exception as err:  # the worker's traceback alone names neither the file nor the manifest line
            where = f"{row.file}, line {row.line}" if row.line > 0 else row.file
            raise RuntimeError(f"{where}: image {str(row.image)!r}: {type(err).__name__}: {err}") from err
        sample: dict[str, Any] = {"image": pixels, "text": row.text, "index": index}
        if self.label_ids is not None:
            sample["label"] = self.label_ids[row.label]
        return sample


def read_manifest(
    path: str | Path,
    image_column: str,
    text_column: str,
    label_column: str | None,
    image_root: str | Path | None = None,
    id_column: str | None = None,
) -> list[ManifestRow]:
    """Read a CSV (``.csv``, ``.tsv``) or JSONL (``.jsonl``, ``.ndjson``) manifest into rows.

    Relative image paths are resolved against ``image_root`` (default: the manifest's folder). ``line`` is the
    1-based line of the file (the CSV header is line 1). ``label_column=None`` reads unlabelled rows (inputs to
    predict on); ``id_column`` is optional: where a row has it, it becomes the row's ``sample_id``.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: for an unknown suffix, missing columns, or a line that is not a JSON object.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {str(path)!r} does not exist")
    root = Path(image_root) if image_root is not None else path.parent
    columns = [column for column in (image_column, text_column, label_column) if column is not None]
    suffix = path.suffix.lower()
    records: list[tuple[int, dict[str, Any]]] = []
    if suffix in (".csv", ".tsv"):
        reader = csv.DictReader(io.StringIO(_read_text(path), newline=""), delimiter="\t" if suffix == ".tsv" else ",")
        try:
            absent = [c for c in columns if c not in (reader.fieldnames or [])]
            if absent:
                raise ValueError(
                    f"manifest {str(path)!r} lacks column(s) {absent}; its columns are {reader.fieldnames}. "
                    "Set image_column / text_column / label_column to match."
                )
            records = [(reader.line_num, record) for record in reader]
        except csv.Error as err:  # e.g. a field larger than the csv module's limit, an unclosed quote
            raise ValueError(f"{path}, line {reader.line_num + 1}: {err}") from err
    elif suffix in (".jsonl", ".ndjson"):
        for number, raw in enumerate(_read_text(path).splitlines(), start=1):
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
        label = record.get(label_column) if label_column is not None else None
        sample_id = record.get(id_column) if id_column is not None else None
        rows.append(
            ManifestRow(
                file=str(path),
                line=number,
                image=(root / image) if image else Path(),
                text=str(record.get(text_column) or "").strip(),
                label=str(label if label is not None else "").strip(),
                sample_id=str(sample_id if sample_id is not None else "").strip(),
            )
        )
    return rows


def _read_text(path: Path) -> str:
    """The text of a manifest: UTF-8, with or without a byte-order mark; anything else is an error naming the line."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ValueError(
            f"{path}, line {line}: not UTF-8 (byte {raw[err.start]:#04x} at offset {err.start}); save the manifest as "
            "UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from err


def row_problem(
    row: ManifestRow,
    known_labels: set[str] | None,
    image_problems: Mapping[Path, str] | None = None,
    require_label: bool = True,
) -> str | None:
    """Why ``row`` cannot be used (a reading problem, missing, truncated or corrupt image, empty text, unknown label),
    or ``None``. Images are decoded in full (:func:`~ml_optim_plugins.data.checks.image_problem`) unless
    ``image_problems`` holds the verdicts of an earlier :func:`~ml_optim_plugins.data.checks.check_images`.
    ``require_label=False`` checks an input to predict on, which has no label."""
    if row.problem:
        return row.problem
    if require_label and not row.label:
        return "empty label"
    if require_label and known_labels is not None and row.label not in known_labels:
        return f"unknown label {row.label!r}; known labels are {sorted(known_labels)}"
    if not row.text:
        return "empty text"
    if row.image == Path():
        return "empty image path"
    if image_problems is None:
        return image_problem(row.image)
    return image_problems.get(row.image)


def partition_rows(
    rows: Sequence[ManifestRow],
    known_labels: set[str] | None,
    image_problems: Mapping[Path, str] | None = None,
    require_label: bool = True,
) -> tuple[list[ManifestRow], list[tuple[str, int, str]]]:
    """The usable rows of ``rows``, and ``(file, line, problem)`` for each of the others (:func:`row_problem`).

    Example:
        >>> ok, bad = partition_rows([ManifestRow("m.csv", 2, Path("a.jpg"), "", "positive")], None, {})
        >>> ok, bad
        ([], [('m.csv', 2, 'empty text')])
    """
    good, problems = [], []
    for row in rows:
        problem = row_problem(row, known_labels, image_problems, require_label)
        if problem is None:
            good.append(row)
        else:
            problems.append((row.file, row.line, problem))
    return good, problems


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
