"""MVSA-Single and MVSA-Multiple (Niu et al., MMM 2016): tweets with their images, labelled for sentiment.

A dataset root holds ``data/<id>.jpg`` (the image), ``data/<id>.txt`` (the tweet) and ``labelResultAll.txt``, a
tab-separated file with one line per sample: the ID, then one ``<text label>,<image label>`` pair per annotator (one
for MVSA-Single, three for MVSA-Multiple), each label ``positive``, ``neutral`` or ``negative``.

The labels are cleaned as in the work that popularised MVSA for image + text sentiment (e.g. Xu and Mao, CIKM 2017):
a majority vote per modality across the annotators, then one label per (text, image) pair; :func:`clean_mvsa_labels`
holds the rules.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch.utilities import rank_zero_info

from ml_optim_plugins.data.manifest import ManifestDataModule, ManifestRow
from ml_optim_plugins.data.mvsa_files import LABEL_FILE, read_tweet

MVSA_LABELS = ("negative", "neutral", "positive")
CONFLICT = "conflict"
NO_MAJORITY = "no_majority"
_ANNOTATORS = {"single": 1, "multiple": 3}


def _majority_label(votes: Sequence[str]) -> str | None:
    """The label that more than half of ``votes`` give (2 of 3 annotators; the only one of one), or ``None``."""
    label, count = Counter(votes).most_common(1)[0]
    return label if 2 * count > len(votes) else None


def _pair_label(text: str, image: str) -> str | None:
    """One label for a (text, image) pair: equal labels, or the polar one beside ``neutral``; ``None``: conflict."""
    if text == image or image == "neutral":
        return text
    if text == "neutral":
        return image
    return None


def clean_mvsa_labels(pairs: Sequence[tuple[str, str]]) -> tuple[str | None, str | None]:
    """The sample label of MVSA annotations, or why the sample is dropped.

    ``pairs`` holds one ``(text label, image label)`` pair per annotator. First each modality takes the label that more
    than half of the annotators gave (2 of 3 for MVSA-Multiple; with one annotator, its label); a modality without one
    drops the sample (``"no_majority"``). Then the two modality labels give one: equal labels give that label, a
    neutral and a polar label give the polar one, positive against negative drops the sample (``"conflict"``).

    Args:
        pairs: ``(text, image)`` labels per annotator, each ``"negative"``, ``"neutral"`` or ``"positive"``.

    Returns:
        ``(label, None)`` for a kept sample, ``(None, "conflict")`` or ``(None, "no_majority")`` for a dropped one.

    Raises:
        ValueError: for no pairs or a label outside ``negative``, ``neutral``, ``positive``.

    Example:
        >>> clean_mvsa_labels([("neutral", "positive")])
        ('positive', None)
        >>> clean_mvsa_labels([("positive", "negative")])
        (None, 'conflict')
        >>> clean_mvsa_labels([("positive", "neutral"), ("positive", "negative"), ("negative", "neutral")])
        ('positive', None)
        >>> clean_mvsa_labels([("positive", "neutral"), ("neutral", "neutral"), ("negative", "neutral")])
        (None, 'no_majority')
    """
    if not pairs:
        raise ValueError("no (text, image) label pairs; pass one per annotator")
    unknown = sorted({label for pair in pairs for label in pair} - set(MVSA_LABELS))
    if unknown:
        raise ValueError(f"unknown MVSA label(s) {unknown}; the labels are {list(MVSA_LABELS)}")
    text = _majority_label([text for text, _ in pairs])
    image = _majority_label([image for _, image in pairs])
    if text is None or image is None:
        return None, NO_MAJORITY
    label = _pair_label(text, image)
    return (label, None) if label is not None else (None, CONFLICT)


def _variant(label_file: Path, header: str, variant: str) -> str:
    """The variant that ``header`` (the first line of ``label_file``) shows, checked against ``variant``."""
    cells = header.strip().split("\t")
    found = {2: "single", 4: "multiple"}.get(len(cells))
    if cells[0].strip().upper() != "ID" or found is None:
        raise ValueError(
            f"{label_file}, line 1: expected the header 'ID<tab>text,image' (MVSA-Single) or "
            f"'ID<tab>text,image<tab>text,image<tab>text,image' (MVSA-Multiple), got {header!r}"
        )
    if variant not in ("auto", found):
        raise ValueError(
            f"variant={variant!r}, but {label_file} is MVSA-{found.capitalize()} ({_ANNOTATORS[found]} annotator "
            f"column(s)); pass variant={found!r} or 'auto'"
        )
    return found


def _label_pairs(cells: Sequence[str]) -> list[tuple[str, str]]:
    """The ``(text, image)`` labels of the ``text,image`` cells of one line; ``ValueError`` says what is wrong."""
    pairs = []
    for cell in cells:
        labels = [label.strip().lower() for label in cell.split(",")]
        if len(labels) != 2:
            raise ValueError(f"{cell!r} is not a 'text,image' label pair")
        for label in labels:
            if label not in MVSA_LABELS:
                raise ValueError(f"unknown label {label!r}; known labels are {list(MVSA_LABELS)}")
        pairs.append((labels[0], labels[1]))
    return pairs


def read_mvsa(
    root: str | Path, variant: Literal["auto", "single", "multiple"] = "auto"
) -> tuple[list[ManifestRow], dict[str, Any]]:
    """Read an MVSA root and clean its labels (:func:`clean_mvsa_labels`).

    The variant comes from the header of ``labelResultAll.txt`` (two columns: Single, four: Multiple). Each line is
    parsed, its labels cleaned, and the text of a kept sample read (:func:`read_tweet`). Images are not opened here:
    :class:`MVSADataModule` checks them like any manifest row (:func:`~ml_optim_plugins.data.manifest.row_problem`).

    Args:
        root: the folder holding ``labelResultAll.txt`` and ``data/``.
        variant: ``"single"``, ``"multiple"`` or ``"auto"`` (from the header).

    Returns:
        The rows, in file order: one per kept sample, and one per bad line (malformed, unknown label, duplicate ID,
        missing, unreadable or empty text file) with its ``problem`` set; and the counts ``{"variant", "samples",
        "kept": {label: n}, "dropped": {"conflict": n, "no_majority": n}, "bad_rows"}``, where ``samples`` (the
        label lines) is the sum of the others.

    Raises:
        FileNotFoundError: when ``root`` has no ``labelResultAll.txt``.
        ValueError: for an unknown ``variant``, a header of neither variant, or a ``variant`` the header contradicts.

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> (root / "data").mkdir()
        >>> for i, text in ((1, "what a lovely day"), (2, "stuck in traffic")):
        ...     _ = (root / "data" / f"{i}.txt").write_text(text)
        >>> _ = (root / LABEL_FILE).write_text("ID\\ttext,image\\n1\\tpositive,neutral\\n2\\tnegative,positive\\n")
        >>> rows, counts = read_mvsa(root)
        >>> [(row.text, row.label) for row in rows], counts["dropped"]
        ([('what a lovely day', 'positive')], {'conflict': 1, 'no_majority': 0})
    """
    if variant not in ("auto", *_ANNOTATORS):
        raise ValueError(f"variant={variant!r}; expected 'single', 'multiple' or 'auto'")
    root = Path(root)
    label_file = root / LABEL_FILE
    if not label_file.is_file():
        raise FileNotFoundError(f"{str(label_file)!r} does not exist; an MVSA root holds {LABEL_FILE} and data/")
    lines = label_file.read_text(encoding="utf-8-sig").splitlines()
    found = _variant(label_file, lines[0] if lines else "", variant)
    stats: dict[str, Any] = {
        "variant": found,
        "samples": 0,
        "kept": dict.fromkeys(MVSA_LABELS, 0),
        "dropped": {CONFLICT: 0, NO_MAJORITY: 0},
        "bad_rows": 0,
    }
    rows: list[ManifestRow] = []
    first_line: dict[str, int] = {}
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        stats["samples"] += 1
        cells = line.strip().split("\t")
        sample_id = cells[0].strip()
        try:
            if len(cells) != _ANNOTATORS[found] + 1:
                raise ValueError(f"expected {_ANNOTATORS[found] + 1} tab-separated columns, got {len(cells)}")
            if sample_id in first_line:
                raise ValueError(f"duplicate ID {sample_id!r} (first on line {first_line[sample_id]})")
            label, dropped = clean_mvsa_labels(_label_pairs(cells[1:]))
        except ValueError as err:
            stats["bad_rows"] += 1
            rows.append(ManifestRow(str(label_file), number, Path(), "", "", problem=str(err)))
            continue
        first_line[sample_id] = number
        if label is None:
            stats["dropped"][dropped] += 1
            continue
        text_file = root / "data" / f"{sample_id}.txt"
        try:
            text = read_tweet(text_file)
            problem = "" if text else f"text file {str(text_file)!r} is empty"
        except FileNotFoundError:
            text, problem = "", f"text file {str(text_file)!r} not found"
        except OSError as err:
            text, problem = "", f"text file {str(text_file)!r} is unreadable ({err})"
        if problem:
            stats["bad_rows"] += 1
        else:
            stats["kept"][label] += 1
        rows.append(ManifestRow(str(label_file), number, root / "data" / f"{sample_id}.jpg", text, label, problem))
    return rows, stats


class MVSADataModule(ManifestDataModule):
    """MVSA-Single or MVSA-Multiple, cleaned, split and ready for training.

    Reads a dataset root with :func:`read_mvsa` (variant from the label file's header, or checked against
    ``variant``), cleans the labels (:func:`clean_mvsa_labels`), checks every kept sample (its image must open, its
    text file must hold text), and splits the clean samples at random, seeded, into train / val / test (8:1:1 by
    default). Everything else is :class:`ManifestDataModule`: bad rows raise :class:`ManifestError` with file and line
    (``on_bad_rows="skip"`` leaves them out and warns), the label order is fixed (saved in the checkpoint and as
    ``labels.json``), and batches are ``{"image", "text", "label", "index"}``.

    The outcome of cleaning, ``.cleaning`` (``{"variant", "samples", "kept": {label: n}, "dropped": {"conflict": n,
    "no_majority": n}, "bad_rows": n}``; ``kept`` and ``bad_rows`` after the image checks), is logged when the data
    module is built and written as ``mvsa_cleaning.json`` beside ``labels.json`` at ``setup`` (rank 0).

    Args:
        root: the folder holding ``labelResultAll.txt`` and ``data/``.
        variant: ``"single"``, ``"multiple"`` or ``"auto"`` (from the label file's header).
        val_fraction: share of the clean samples used for validation.
        test_fraction: share of the clean samples used for testing.
        split_seed: seed of the split.
        split_dir: instead of the seeded split, the published folds of Cheema et al. (2021): the folder with their
            ``valid_pairlist.txt`` and ``splits/`` (:func:`~ml_optim_plugins.data.mvsa_folds.read_mvsa_folds`). Their
            posts and labels must be those of this cleaning (checked post by post).
        fold: the fold of ``split_dir``, 1 to 10.
        labels: ``negative``, ``neutral``, ``positive`` in class-id order.
        on_bad_rows: ``"raise"`` or ``"skip"``.
        image_model: the image encoder's timm architecture, whose data config makes the image transforms (``None``:
            timm's ImageNet defaults).
        image_size: side of the square crops given to the image encoder; ``None``: the architecture's input size.
        augment: random resized crops and flips in training.
        batch_size: samples per batch.
        num_workers: DataLoader worker processes.
        tokenizer: text model whose tokenizer to use; ``None`` keeps raw strings.
        max_length: longest tokenised text.
        predict: inputs to predict on (a manifest of image path and text, another MVSA root, or a folder of
            ``<id>.jpg`` + ``<id>.txt``; see :class:`~ml_optim_plugins.MultimodalDataModule`).

    Raises:
        ValueError: for ``labels`` that are not the three MVSA labels, or a ``variant`` the label file contradicts.
        ManifestError: for bad rows, unless ``on_bad_rows="skip"``.

    Example:
        >>> import tempfile
        >>> from PIL import Image
        >>> root = Path(tempfile.mkdtemp())
        >>> (root / "data").mkdir()
        >>> lines = ["ID\\ttext,image"]
        >>> for i, (text, image) in enumerate([("positive", "positive"), ("neutral", "negative"),
        ...                                    ("neutral", "neutral"), ("positive", "negative")] * 3, start=1):
        ...     Image.new("RGB", (16, 16)).save(root / "data" / f"{i}.jpg")
        ...     _ = (root / "data" / f"{i}.txt").write_text(f"tweet {i}")
        ...     lines.append(f"{i}\\t{text},{image}")
        >>> _ = (root / "labelResultAll.txt").write_text("\\n".join(lines) + "\\n")
        >>> dm = MVSADataModule(str(root), image_size=16, tokenizer=None)
        >>> dm.cleaning["kept"], dm.cleaning["dropped"]["conflict"], {k: len(v) for k, v in dm.splits.items()}
        ({'negative': 3, 'neutral': 3, 'positive': 3}, 3, {'val': 1, 'test': 1, 'train': 7})
    """

    def __init__(
        self,
        root: str,
        variant: Literal["auto", "single", "multiple"] = "auto",
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        split_seed: int = 0,
        split_dir: str | None = None,
        fold: int = 1,
        labels: Sequence[str] = MVSA_LABELS,
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
        if sorted(labels) != sorted(MVSA_LABELS):
            raise ValueError(f"labels={list(labels)}; give the MVSA labels {list(MVSA_LABELS)} in class-id order")
        # ManifestDataModule.__init__ calls read_rows(), which needs these.
        self.root = Path(root)
        self.variant = variant
        self.split_dir, self.fold = split_dir, fold
        self._read_counts: dict[str, Any] = {}
        super().__init__(
            str(self.root / LABEL_FILE),
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            split_seed=split_seed,
            labels=list(labels),
            on_bad_rows=on_bad_rows,
            image_model=image_model,
            image_size=image_size,
            augment=augment,
            batch_size=batch_size,
            num_workers=num_workers,
            tokenizer=tokenizer,
            max_length=max_length,
            predict=predict,
        )
        kept = Counter(row.label for rows in self.splits.values() for row in rows)
        self.cleaning: dict[str, Any] = {
            **self._read_counts,
            "kept": {label: kept[label] for label in MVSA_LABELS},
            "bad_rows": len(self.skipped_rows),
        }
        dropped = self.cleaning["dropped"]
        sizes = ", ".join(f"{split} {len(rows)}" for split, rows in self.splits.items())
        rank_zero_info(
            f"MVSA-{self.cleaning['variant'].capitalize()} at {str(self.root)!r}: {self.cleaning['samples']} samples, "
            f"kept {sum(kept.values())} ({', '.join(f'{n} {label}' for label, n in self.cleaning['kept'].items())}), "
            f"dropped {dropped[CONFLICT]} as conflict and {dropped[NO_MAJORITY]} without majority, "
            f"{self.cleaning['bad_rows']} bad row(s); split {sizes}"
        )

    def read_rows(self) -> dict[str, list[ManifestRow]]:
        """The cleaned rows of :func:`read_mvsa`: all as ``"train"`` (the seeded split makes val and test), or, with
        ``split_dir``, in the train / val / test of the published fold."""
        rows, self._read_counts = read_mvsa(self.root, self.variant)
        if self.split_dir is None:
            return {"train": rows}
        from ml_optim_plugins.data.mvsa_folds import read_mvsa_folds

        folds, fold_labels = read_mvsa_folds(self.split_dir, self.fold)
        by_id = {row.image.stem: row for row in rows if not row.problem}
        differ = [f"{post} ({by_id[post].label} here, {label} there)" if post in by_id else f"{post} (not kept here)"
                  for post, label in fold_labels.items() if post not in by_id or by_id[post].label != label]
        differ += [f"{post} (not in the fold files)" for post in by_id if post not in fold_labels]
        if differ:
            raise ValueError(
                f"the posts of {self.split_dir} differ from this cleaning of {self.root} in {len(differ)} place(s): "
                f"{', '.join(differ[:8])}; use the published folds only with the data they were made for"
            )
        problems = [row for row in rows if row.problem]  # reported by the row checks, with their line
        return {"train": [by_id[post] for post in folds["train"]] + problems,
                "val": [by_id[post] for post in folds["val"]], "test": [by_id[post] for post in folds["test"]]}

    def setup(self, stage: str) -> None:
        super().setup(stage)
        self._save_to_log_dir("mvsa_cleaning.json", self.cleaning, "MVSA cleaning counts")
