"""The published 10-fold MVSA splits (Cheema et al. 2021): read by row number, checked against our cleaning."""

from __future__ import annotations

from pathlib import Path

import pytest

from ml_optim_plugins import MVSADataModule
from ml_optim_plugins.data import read_mvsa
from ml_optim_plugins.data.mvsa_folds import read_mvsa_folds
from tests.data.mvsa_fixture import write_mvsa

CODES = {"neutral": "0", "positive": "1", "negative": "2"}


def write_folds(split_dir: Path, root: Path, relabel: dict[str, str] | None = None, drop: int = 0) -> dict[str, list[str]]:
    """Fold files for the kept posts of an MVSA root in the published layout: row numbers into valid_pairlist.txt,
    fold k tests every 10th row from k - 1, validates the next one; returns the IDs of fold 1."""
    rows, _ = read_mvsa(root)
    kept = [(row.image.stem, row.label) for row in rows if not row.problem][drop:]
    relabel = relabel or {}
    (split_dir / "splits").mkdir(parents=True)
    (split_dir / "valid_pairlist.txt").write_text(
        "".join(f"{post},{CODES[relabel.get(post, label)]},0,0\n" for post, label in kept)
    )
    ids = {}
    for fold in range(1, 11):
        test = [i for i in range(len(kept)) if i % 10 == fold - 1]
        val = [i for i in range(len(kept)) if i % 10 == fold % 10]
        train = [i for i in range(len(kept)) if i not in test and i not in val]
        for split, members in (("train", train), ("val", val), ("test", test)):
            (split_dir / "splits" / f"{split}_{fold}.txt").write_text("".join(f"{i}\n" for i in members))
            if fold == 1:
                ids[split] = [kept[i][0] for i in members]
    return ids


def test_a_published_fold_sets_the_splits(tmp_path):
    root = write_mvsa(tmp_path / "mvsa", n=40)
    expected = write_folds(tmp_path / "folds", root)
    data = MVSADataModule(str(root), split_dir=str(tmp_path / "folds"), fold=1, tokenizer=None, image_size=16)
    assert {split: [row.image.stem for row in rows] for split, rows in data.splits.items()} == expected
    other = MVSADataModule(str(root), split_dir=str(tmp_path / "folds"), fold=2, tokenizer=None, image_size=16)
    assert {row.image.stem for row in other.splits["test"]}.isdisjoint({row.image.stem for row in data.splits["test"]})


@pytest.mark.parametrize(("relabel", "drop", "match"), [({"1": "negative"}, 0, r"1 \(positive here, negative there\)"),
                                                         (None, 1, r"not in the fold files")])
def test_folds_made_for_other_posts_or_labels_are_refused(tmp_path, relabel, drop, match):
    root = write_mvsa(tmp_path / "mvsa", n=40)
    rows, _ = read_mvsa(root)
    first = next(row for row in rows if not row.problem)
    relabel = {first.image.stem: "negative" if first.label != "negative" else "positive"} if relabel else None
    write_folds(tmp_path / "folds", root, relabel=relabel, drop=drop)
    if relabel:
        match = rf"{first.image.stem} \({first.label} here, {relabel[first.image.stem]} there\)"
    with pytest.raises(ValueError, match=match):
        MVSADataModule(str(root), split_dir=str(tmp_path / "folds"), tokenizer=None, image_size=16)


@pytest.mark.parametrize(
    ("damage", "error", "match"),
    [
        (lambda d: (d / "valid_pairlist.txt").unlink(), FileNotFoundError, "valid_pairlist.txt"),
        (lambda d: (d / "splits" / "val_1.txt").unlink(), FileNotFoundError, "val_1.txt"),
        (lambda d: (d / "splits" / "test_1.txt").write_text("0\n999\n"), ValueError, r"test_1.txt, line 2: '999'"),
        (lambda d: (d / "splits" / "test_1.txt").write_text((d / "splits" / "train_1.txt").read_text().split()[0]),
         ValueError, r"post '\d+' is in both 'train' and 'test'"),
        (lambda d: (d / "valid_pairlist.txt").write_text("7;1;0;1\n"), ValueError, r"valid_pairlist.txt, line 1"),
    ],
)
def test_damaged_fold_files_are_named(tmp_path, damage, error, match):
    root = write_mvsa(tmp_path / "mvsa", n=20)
    write_folds(tmp_path / "folds", root)
    damage(tmp_path / "folds")
    with pytest.raises(error, match=match):
        read_mvsa_folds(tmp_path / "folds", 1)


def test_fold_out_of_range_is_refused(tmp_path):
    with pytest.raises(ValueError, match="fold=11"):
        read_mvsa_folds(tmp_path, 11)
