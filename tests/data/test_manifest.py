from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from ml_optim_plugins import ManifestDataModule
from ml_optim_plugins.data import ManifestError

ROWS = [
    ("img0.png", "a lovely day", "positive"),
    ("img1.png", "a dreadful film", "negative"),
    ("img2.png", "it was fine", "neutral"),
    ("img3.png", "superb service", "positive"),
    ("img4.png", "boring and poor", "negative"),
    ("img5.png", "ordinary stuff", "neutral"),
    ("img6.png", "great fun", "positive"),
    ("img7.png", "awful food", "negative"),
    ("img8.png", "average", "neutral"),
    ("img9.png", "wonderful", "positive"),
]


def write_manifest(path: Path, rows, fmt: str, columns=("image", "text", "label")) -> Path:
    if fmt == "csv":
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(columns)
            writer.writerows(rows)
    else:
        path.write_text("".join(json.dumps(dict(zip(columns, row))) + "\n" for row in rows))
    return path


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    for i in range(10):
        Image.new("RGB", (20, 16), (25 * i, 100, 200)).save(tmp_path / f"img{i}.png")
    return tmp_path


def make_dm(path: Path, **kwargs) -> ManifestDataModule:
    return ManifestDataModule(str(path), image_size=16, batch_size=4, max_length=16, **kwargs)


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_reads_rows_maps_labels_and_batches(image_dir, fmt):
    path = write_manifest(image_dir / f"train.{fmt}", ROWS, fmt)
    dm = make_dm(path, val_fraction=0.2)
    assert list(dm.class_names) == ["negative", "neutral", "positive"] and dm.num_classes == 3
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 8 and len(dm.datasets["val"]) == 2
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (2, 3, 16, 16)
    assert "input_ids" in batch["text"] and batch["label"].dtype == torch.long


def test_seeded_split_is_deterministic_and_disjoint(image_dir):
    path = write_manifest(image_dir / "train.csv", ROWS, "csv")
    a, b = make_dm(path, val_fraction=0.2, test_fraction=0.2), make_dm(path, val_fraction=0.2, test_fraction=0.2)
    images = {split: [r.image.name for r in a.splits[split]] for split in ("train", "val", "test")}
    assert images == {split: [r.image.name for r in b.splits[split]] for split in images}
    assert len(set().union(*images.values())) == 10 and [len(v) for v in images.values()] == [6, 2, 2]
    other = make_dm(path, val_fraction=0.2, test_fraction=0.2, split_seed=1)
    assert [r.image.name for r in other.splits["val"]] != images["val"]


def test_custom_columns_fixed_label_order_and_separate_val(image_dir):
    columns = ("path", "caption", "sentiment")
    train = write_manifest(image_dir / "train.csv", ROWS[:8], "csv", columns)
    val = write_manifest(image_dir / "val.jsonl", ROWS[8:], "jsonl", columns)
    labels = ["positive", "neutral", "negative"]
    dm = make_dm(train, val=str(val), image_column="path", text_column="caption", label_column="sentiment", labels=labels)
    dm.setup("fit")
    assert len(dm.datasets["val"]) == 2 and dm.datasets["val"][1]["label"] == 0  # "wonderful" -> positive -> id 0


def test_bad_rows_are_reported_with_file_and_line(image_dir):
    (image_dir / "broken.png").write_bytes(b"not a png")
    rows = [*ROWS[:3], ("missing.png", "x", "positive"), ("broken.png", "y", "negative"), ("img3.png", "", "neutral")]
    train = write_manifest(image_dir / "train.csv", rows, "csv")
    val = write_manifest(image_dir / "val.csv", [("img4.png", "so so", "mixed")], "csv")
    with pytest.raises(ManifestError) as info:
        make_dm(train, val=str(val))
    lines = {(Path(file).name, line): message for file, line, message in info.value.problems}
    assert set(lines) == {("train.csv", 5), ("train.csv", 6), ("train.csv", 7), ("val.csv", 2)}
    assert "not found" in lines[("train.csv", 5)] and "unreadable" in lines[("train.csv", 6)]
    assert "empty text" in lines[("train.csv", 7)] and "unknown label 'mixed'" in lines[("val.csv", 2)]
    assert "train.csv, line 5" in str(info.value) and "on_bad_rows='skip'" in str(info.value)


def test_skip_bad_rows_reports_the_count(image_dir):
    rows = [*ROWS, ("missing.png", "x", "positive")]
    path = write_manifest(image_dir / "train.csv", rows, "csv")
    with pytest.warns(UserWarning, match="skipped 1 bad row"):
        dm = make_dm(path, on_bad_rows="skip", val_fraction=0.2)
    assert len(dm.skipped_rows) == 1 and sum(len(rows) for rows in dm.splits.values()) == 10


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"image_column": "picture"}, ValueError, r"lacks column\(s\) \['picture'\]"),
        ({"on_bad_rows": "ignore"}, ValueError, "on_bad_rows='ignore'"),
        ({"val_fraction": 1.0}, ValueError, r"val_fraction must be a finite number in \[0, 1\), got 1.0"),
        ({"labels": ["a", "a"]}, ValueError, "duplicates"),
    ],
)
def test_bad_configuration(image_dir, kwargs, error, match):
    path = write_manifest(image_dir / "train.csv", ROWS, "csv")
    with pytest.raises(error, match=match):
        make_dm(path, **kwargs)


def test_unknown_format_and_missing_file(image_dir):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_dm(image_dir / "nope.csv")
    (image_dir / "train.xlsx").write_text("x")
    with pytest.raises(ValueError, match="unknown format '.xlsx'"):
        make_dm(image_dir / "train.xlsx")


def test_label_names_saved_and_checked_on_resume(image_dir):
    path = write_manifest(image_dir / "train.csv", ROWS, "csv")
    dm = make_dm(path)
    state = dm.state_dict()
    assert state == {"class_names": ["negative", "neutral", "positive"]}
    reordered = make_dm(path, labels=["positive", "neutral", "negative"])
    with pytest.raises(ValueError, match="trained with labels"):
        reordered.load_state_dict(state)
