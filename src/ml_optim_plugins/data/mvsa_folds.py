"""The published 10-fold MVSA splits of Cheema et al. (2021), read as post IDs per split.

"A Fair and Comprehensive Comparison of Multimodal Tweet Sentiment Analysis Methods" (Cheema, Hakimov, Müller-Budack,
Ewerth; MMPT workshop at ICMR 2021) released, for MVSA-Single and MVSA-Multiple, the cleaned posts and ten stratified
train / validation / test folds, so that methods can be compared on the same samples. Their layout (repository
``cleopatra-itn/fair_multimodal_sentiment``, folder ``data/mvsa_single`` or ``data/mvsa_multiple``):

* ``valid_pairlist.txt``: no header, one kept post a line, ``file_id,multimodal_label,text_label,image_label`` with the
  labels coded 0 neutral, 1 positive, 2 negative; ``file_id`` is the post's ID (``data/<id>.jpg``);
* ``splits/{train,val,test}_<k>.txt`` for folds k = 1..10: one 0-based *row number* of ``valid_pairlist.txt`` a line.
"""

from __future__ import annotations

from pathlib import Path

FOLD_LABELS = {"0": "neutral", "1": "positive", "2": "negative"}
PAIR_LIST = "valid_pairlist.txt"


def read_mvsa_folds(split_dir: str | Path, fold: int) -> tuple[dict[str, list[str]], dict[str, str]]:
    """The post IDs of ``train``, ``val`` and ``test`` in fold ``fold``, and each listed post's label.

    Args:
        split_dir: the folder holding ``valid_pairlist.txt`` and ``splits/``.
        fold: 1 to 10.

    Returns:
        ``({"train": ids, "val": ids, "test": ids}, {id: label})``, IDs in file order.

    Raises:
        FileNotFoundError: when a file of the layout is missing, naming it.
        ValueError: for a fold outside 1..10, a malformed line (file and line named), a row number outside the pair
            list, or splits of one fold that overlap.

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> (root / "splits").mkdir()
        >>> _ = (root / PAIR_LIST).write_text("7,1,0,1\\n9,2,2,0\\n12,0,0,0\\n")
        >>> for split, rows in (("train", "0\\n"), ("val", "2\\n"), ("test", "1\\n")):
        ...     _ = (root / "splits" / f"{split}_1.txt").write_text(rows)
        >>> read_mvsa_folds(root, 1)
        ({'train': ['7'], 'val': ['12'], 'test': ['9']}, {'7': 'positive', '9': 'negative', '12': 'neutral'})
    """
    if not 1 <= fold <= 10:
        raise ValueError(f"fold={fold}; the published splits have folds 1 to 10")
    root = Path(split_dir)
    pair_list = root / PAIR_LIST
    if not pair_list.is_file():
        raise FileNotFoundError(f"{str(pair_list)!r} not found; split_dir holds {PAIR_LIST} and splits/")
    ids: list[str] = []
    labels: dict[str, str] = {}
    for number, line in enumerate(pair_list.read_text(encoding="utf-8").splitlines(), start=1):
        cells = line.strip().split(",")
        if len(cells) != 4 or cells[1] not in FOLD_LABELS:
            raise ValueError(f"{pair_list}, line {number}: expected 'file_id,label,text_label,image_label' with labels "
                             f"0, 1 or 2, got {line!r}")
        ids.append(cells[0])
        labels[cells[0]] = FOLD_LABELS[cells[1]]
    splits: dict[str, list[str]] = {}
    for split in ("train", "val", "test"):
        path = root / "splits" / f"{split}_{fold}.txt"
        if not path.is_file():
            raise FileNotFoundError(f"{str(path)!r} not found; fold {fold} needs splits/{{train,val,test}}_{fold}.txt")
        members = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            if not line.strip().isdigit() or int(line) >= len(ids):
                raise ValueError(f"{path}, line {number}: {line.strip()!r} is not a row number of {PAIR_LIST} "
                                 f"(0 to {len(ids) - 1})")
            members.append(ids[int(line)])
        splits[split] = members
    seen: dict[str, str] = {}
    for split, members in splits.items():
        for post in members:
            if post in seen:
                raise ValueError(f"post {post!r} is in both {seen[post]!r} and {split!r} of fold {fold}")
            seen[post] = split
    return splits, labels
