"""Data integrity before training: images decoded in full, encodings and labels checked, duplicates kept together."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from PIL import Image

from ml_optim_plugins import ManifestDataModule
from ml_optim_plugins.data import ManifestError
from ml_optim_plugins.data import checks
from tests.data.test_manifest import ROWS, image_dir, make_dm, write_manifest  # noqa: F401 - the fixture


def truncated_jpeg(path: Path) -> Path:
    Image.effect_noise((128, 128), 64).convert("RGB").save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with Image.open(path) as image:
        image.verify()  # what the old pre-check did: it passes
    return path


def test_a_truncated_jpeg_is_reported_with_its_line_before_training(image_dir):
    truncated_jpeg(image_dir / "cut.jpg")
    path = write_manifest(image_dir / "train.csv", [*ROWS, ("cut.jpg", "half a photo", "positive")], "csv")
    with pytest.raises(ManifestError) as info:
        make_dm(path)
    assert [(Path(f).name, line) for f, line, _ in info.value.problems] == [("train.csv", 12)]
    assert "truncated" in info.value.problems[0][2]


def test_image_verdicts_are_cached_and_changed_files_rechecked(tmp_path, monkeypatch):
    paths = []
    for i in range(4):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    cache = tmp_path / "verdicts.json"
    decoded: list[Path] = []
    real = checks.image_problem
    monkeypatch.setattr(checks, "image_problem", lambda p: decoded.append(p) or real(p))
    assert checks.check_images(paths, cache) == {}
    assert sorted(decoded) == sorted(paths)
    decoded.clear()
    assert checks.check_images(paths, cache) == {}
    assert decoded == []
    (tmp_path / "2.png").write_bytes(b"garbage now")
    problems = checks.check_images(paths, cache, workers=2)
    assert decoded == [tmp_path / "2.png"] and list(problems) == [tmp_path / "2.png"]


def test_a_byte_order_mark_in_the_header_is_read(image_dir):
    path = write_manifest(image_dir / "train.csv", ROWS, "csv")
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert sum(len(rows) for rows in make_dm(path).splits.values()) == len(ROWS)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("image,text,label\nimg0.png,ok,positive\nimg1.png,caf\xe9,negative\n".encode("latin-1"), r"train.csv, line 3: not UTF-8"),
        (("image,text,label\nimg0.png,ok,positive\nimg1.png," + "x" * 200_000 + ",negative\n").encode(), r"train.csv, line 3: field larger"),
    ],
    ids=["latin-1", "oversized-field"],
)
def test_unreadable_csv_names_the_line(image_dir, content, match):
    (image_dir / "train.csv").write_bytes(content)
    with pytest.raises(ValueError, match=match):
        make_dm(image_dir / "train.csv")


@pytest.mark.parametrize(("first", "second"), [("positive", "Positive"), ("1", "1.0")])
def test_one_label_spelt_two_ways_is_refused(image_dir, first, second):
    rows = [(image, text, first if label == "positive" else label) for image, text, label in ROWS]
    rows[6] = (rows[6][0], rows[6][1], second)  # line 8 of the CSV
    path = write_manifest(image_dir / "train.csv", rows, "csv")
    with pytest.raises(ValueError, match=rf"'{first}' \(.*train.csv, line 2\) and '{second}' \(.*train.csv, line 8\)"):
        make_dm(path)


def test_duplicated_rows_stay_in_one_split_and_are_reported(image_dir):
    rows = ROWS + [ROWS[0]] * 5 + [ROWS[1]] * 5
    path = write_manifest(image_dir / "train.csv", rows, "csv")
    for seed in range(5):
        with pytest.warns(UserWarning, match=r"10 row\(s\) repeat the image and text of an earlier row"):
            dm = ManifestDataModule(str(path), image_size=16, tokenizer=None, val_fraction=0.3, test_fraction=0.2,
                                    split_seed=seed)
        where = {split: {(row.image.name, row.text) for row in members} for split, members in dm.splits.items()}
        for image, text, _ in ROWS[:2]:
            assert sum((image, text) in members for members in where.values()) == 1, (seed, where)
        assert sum(len(members) for members in dm.splits.values()) == len(rows)


def test_a_duplicate_with_another_label_is_a_bad_row(image_dir):
    rows = [*ROWS, (ROWS[0][0], ROWS[0][1], "negative")]
    path = write_manifest(image_dir / "train.csv", rows, "csv")
    with pytest.raises(ManifestError, match=r"line 12: same image and text as line 2, but label 'negative' there 'positive'"):
        make_dm(path)


def test_an_image_that_breaks_after_the_check_names_file_and_line(image_dir):
    path = write_manifest(image_dir / "train.csv", ROWS, "csv")
    dm = make_dm(path, val_fraction=0.0)
    dm.setup("fit")
    dataset = dm.datasets["train"]
    row = dataset.rows[0]
    row.image.write_bytes(b"broken later")
    with pytest.raises(RuntimeError, match=rf"train.csv, line {row.line}: image .*{row.image.name}"):
        dataset[0]
