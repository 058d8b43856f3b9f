"""Inputs to predict on, in any of three layouts: a manifest without labels (CSV / TSV / JSONL of image path and text,
optionally an id), an MVSA root, or a folder of ``<id>.jpg`` + ``<id>.txt`` pairs.

Rows keep where they came from (file and line; a folder's pairs are named by their text file), so a bad input is
reported as in training, and each row has an id that names it in ``predictions.csv``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ml_optim_plugins.data.checks import check_images, default_check_cache
from ml_optim_plugins.data.mvsa_files import LABEL_FILE, read_tweet
from ml_optim_plugins.data.rows import ManifestRow, partition_rows, read_manifest

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
MANIFEST_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson")


def _natural_key(sample_id: str) -> tuple[int, int, str]:
    """Numeric ids in numeric order (2 before 10), then the others in text order."""
    return (0, int(sample_id), "") if sample_id.isdigit() else (1, 0, sample_id)


def read_folder(folder: str | Path) -> list[ManifestRow]:
    """The ``<id>.jpg`` (``.jpeg``, ``.png``) + ``<id>.txt`` pairs of ``folder``, ordered by id (numerically where
    ids are numbers); an id with only one of the two files, two images, or an unreadable or empty text is a row with
    its ``problem`` set.

    Example:
        >>> import tempfile
        >>> from PIL import Image
        >>> folder = Path(tempfile.mkdtemp())
        >>> for i in (10, 2):
        ...     Image.new("RGB", (8, 8)).save(folder / f"{i}.jpg")
        ...     _ = (folder / f"{i}.txt").write_text(f"post {i}")
        >>> _ = (folder / "7.txt").write_text("no image")
        >>> [(row.sample_id, row.text, row.problem) for row in read_folder(folder)]
        [('2', 'post 2', ''), ('7', '', 'no image 7.jpg beside 7.txt'), ('10', 'post 10', '')]
    """
    folder = Path(folder)
    images: dict[str, list[Path]] = {}
    texts: dict[str, Path] = {}
    for path in folder.iterdir():
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            images.setdefault(path.stem, []).append(path)
        elif path.is_file() and path.suffix.lower() == ".txt":
            texts[path.stem] = path
    rows = []
    for sample_id in sorted(images.keys() | texts.keys(), key=_natural_key):
        found, text_file = sorted(images.get(sample_id, [])), texts.get(sample_id)
        text, problem = "", ""
        if text_file is None:
            problem = f"no text file {sample_id}.txt beside {found[0].name}"
        elif not found:
            problem = f"no image {sample_id}.jpg beside {text_file.name}"
        elif len(found) > 1:
            problem = f"{len(found)} images for id {sample_id!r}: {', '.join(path.name for path in found)}; keep one"
        else:
            try:
                text = read_tweet(text_file)
                problem = "" if text else f"text file {str(text_file)!r} is empty"
            except OSError as err:
                problem = f"text file {str(text_file)!r} is unreadable ({err})"
        source = text_file if text_file is not None else found[0]
        image = found[0] if found else Path()
        rows.append(ManifestRow(str(source), 0, image, text, "", problem, sample_id=sample_id))
    return rows


def read_predict_inputs(
    path: str | Path, image_column: str = "image", text_column: str = "text", id_column: str = "id"
) -> list[ManifestRow]:
    """Read the inputs to predict on at ``path``, in input order, unchecked (see :func:`check_predict_inputs`).

    * A ``.csv`` / ``.tsv`` / ``.jsonl`` / ``.ndjson`` file: a manifest with ``image_column`` and ``text_column`` (image
      paths relative to the manifest's folder) and, optionally, ``id_column``; a label column, if any, is ignored.
      A row without an id is named by its image path as written (relative to the manifest's folder).
    * An MVSA root (a folder holding ``labelResultAll.txt``): the posts of its ``data/`` folder.
    * Any other folder: its ``<id>.jpg`` + ``<id>.txt`` pairs (:func:`read_folder`).

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: for a file of another format, a manifest without the image or text column, or a folder without
            any ``<id>.jpg`` / ``<id>.txt`` file.
    """
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() not in MANIFEST_SUFFIXES:
            raise ValueError(
                f"predict input {str(path)!r}: unknown format {path.suffix!r}; give a manifest "
                f"({', '.join(MANIFEST_SUFFIXES)}), an MVSA root or a folder of <id>.jpg + <id>.txt"
            )
        return _name_rows(read_manifest(path, image_column, text_column, None, id_column=id_column), path.parent)
    if not path.is_dir():
        raise FileNotFoundError(
            f"predict input {str(path)!r} does not exist; give a manifest (.csv, .tsv, .jsonl), an MVSA root or a "
            "folder of <id>.jpg + <id>.txt"
        )
    folder = path / "data" if (path / LABEL_FILE).is_file() else path
    rows = read_folder(folder) if folder.is_dir() else []
    if not rows:
        raise ValueError(
            f"predict input {str(folder)!r} holds no <id>.jpg / <id>.txt file; give a manifest (.csv, .tsv, .jsonl), "
            "an MVSA root or a folder of <id>.jpg + <id>.txt"
        )
    return rows


def _name_rows(rows: list[ManifestRow], folder: Path) -> list[ManifestRow]:
    """Rows with an id named by it (an id given twice is a bad row), the others by their image path as written."""
    first: dict[str, int] = {}
    named = []
    for row in rows:
        if row.sample_id:
            if row.sample_id in first and not row.problem:
                row = replace(row, problem=f"id {row.sample_id!r} repeats line {first[row.sample_id]}")
            first.setdefault(row.sample_id, row.line)
        elif row.image != Path():
            written = row.image.relative_to(folder) if row.image.is_relative_to(folder) else row.image
            row = replace(row, sample_id=str(written))
        named.append(row)
    return named


def check_predict_inputs(rows: list[ManifestRow]) -> tuple[list[ManifestRow], list[tuple[str, int, str]]]:
    """The usable inputs, and ``(file, line, problem)`` for the others: a reading problem (an id given twice, a
    missing text file), a missing or undecodable image (decoded in full, verdicts cached as in training), or an empty
    text."""
    images = check_images(
        [row.image for row in rows if not row.problem and row.image != Path()], cache_file=default_check_cache()
    )
    return partition_rows(rows, None, images, require_label=False)
