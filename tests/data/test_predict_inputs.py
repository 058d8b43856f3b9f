"""Inputs to predict on: unlabelled manifests, MVSA roots, folders of <id>.jpg + <id>.txt, and their bad rows."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from ml_optim_plugins import ManifestDataModule, MVSADataModule, SyntheticSentimentDataModule
from ml_optim_plugins.data import ManifestError
from ml_optim_plugins.data.predict_inputs import read_predict_inputs
from tests.data.mvsa_fixture import write_mvsa_samples


def write_images(folder: Path, n: int, suffix: str = ".jpg") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        Image.new("RGB", (40, 30), (30 * i, 90, 160)).save(folder / f"{i}{suffix}")
        paths.append(folder / f"{i}{suffix}")
    return paths


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def synthetic(predict: Path, **kwargs) -> SyntheticSentimentDataModule:
    return SyntheticSentimentDataModule(
        train_size=8, val_size=4, test_size=4, image_size=32, batch_size=4, max_length=16, predict=str(predict), **kwargs
    )


def test_unlabelled_csv_manifest_with_ids_is_served_in_input_order_without_labels(tmp_path):
    write_images(tmp_path / "img", 5)
    manifest = write_csv(tmp_path / "new.csv", ["id", "image", "text"],
                         [[f"p{i}", f"img/{i}.jpg", f"post number {i}"] for i in (3, 0, 4, 1, 2)])
    dm = synthetic(manifest)
    dm.setup("predict")
    dataset = dm.datasets["predict"]
    assert dataset.ids == ["p3", "p0", "p4", "p1", "p2"] and dm.has_split("predict")
    batch = next(iter(dm.predict_dataloader()))
    assert "label" not in batch and batch["index"].tolist() == [0, 1, 2, 3]
    assert batch["image"].shape == (4, 3, 32, 32) and "input_ids" in batch["text"]
    # prepared as the generated images are: resized to image_size, pixels in [0, 1]
    assert 0.0 <= float(batch["image"].min()) and float(batch["image"].max()) <= 1.0


def test_jsonl_manifest_without_ids_names_rows_by_their_image_path_and_ignores_labels(tmp_path):
    write_images(tmp_path / "img", 3)
    lines = [{"image": f"img/{i}.jpg", "text": f"post {i}", "label": "positive"} for i in range(3)]
    lines.append({"image": "img/0.jpg", "text": "another post with the same picture"})  # a repeated image is fine
    manifest = tmp_path / "new.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    dm = synthetic(manifest)
    dm.setup("predict")
    assert dm.datasets["predict"].ids == ["img/0.jpg", "img/1.jpg", "img/2.jpg", "img/0.jpg"]
    assert "label" not in dm.datasets["predict"][0]


def test_manifest_data_module_reads_its_own_column_names(tmp_path):
    write_images(tmp_path / "img", 4, ".png")
    train = write_csv(tmp_path / "train.csv", ["picture", "caption", "sentiment"],
                      [[f"img/{i}.png", f"text {i}", "good" if i % 2 else "bad"] for i in range(4)])
    new = write_csv(tmp_path / "new.csv", ["picture", "caption"], [["img/1.png", "fresh text"]])
    dm = ManifestDataModule(str(train), val_fraction=0.25, image_column="picture", text_column="caption",
                            label_column="sentiment", image_size=16, max_length=16, predict=str(new))
    dm.setup("predict")
    assert [row.text for row in dm.datasets["predict"].rows] == ["fresh text"]
    # the evaluation transform of the training data (no augmentation)
    assert torch.equal(dm.datasets["predict"][0]["image"], dm.transform(train=False)(Image.open(tmp_path / "img/1.png")))


def test_folder_of_id_pairs_in_numeric_order(tmp_path):
    folder = tmp_path / "posts"
    write_images(folder, 3)
    Image.new("RGB", (8, 8)).save(folder / "10.png")
    for i in (0, 1, 2, 10):
        (folder / f"{i}.txt").write_text(f" tweet {i}\n")
    (folder / "notes.md").write_text("not a post")
    dm = synthetic(folder)
    dm.setup("predict")
    assert dm.datasets["predict"].ids == ["0", "1", "2", "10"]
    assert [row.text for row in dm.datasets["predict"].rows] == ["tweet 0", "tweet 1", "tweet 2", "tweet 10"]


def test_mvsa_root_predicts_every_post_of_its_data_folder(tmp_path):
    pairs = [[("positive", "positive")], [("positive", "negative")], [("neutral", "neutral")]]  # post 2: a conflict
    root = write_mvsa_samples(tmp_path / "MVSA_Single", pairs)
    assert [row.sample_id for row in read_predict_inputs(root)] == ["1", "2", "3"]
    training = write_mvsa_samples(tmp_path / "train", [[("positive", "positive")], [("negative", "negative")],
                                                        [("neutral", "neutral")]] * 4)
    dm = MVSADataModule(str(training), image_size=16, tokenizer=None, predict=str(root))
    dm.setup("predict")
    assert dm.datasets["predict"].ids == ["1", "2", "3"]  # the conflicting post too: labels play no part
    assert "café" in dm.datasets["predict"].rows[2].text  # the Latin-1 tweet, read as in training


def test_bad_inputs_are_reported_with_file_and_line(tmp_path):
    write_images(tmp_path / "img", 2)
    (tmp_path / "img" / "cut.jpg").write_bytes((tmp_path / "img" / "0.jpg").read_bytes()[:200])
    manifest = write_csv(tmp_path / "new.csv", ["id", "image", "text"], [
        ["a", "img/0.jpg", "fine"],
        ["b", "img/missing.jpg", "no picture"],
        ["c", "img/1.jpg", ""],
        ["a", "img/1.jpg", "id again"],
        ["d", "img/cut.jpg", "truncated picture"],
    ])
    dm = synthetic(manifest)
    with pytest.raises(ManifestError) as info:
        dm.setup("predict")
    message = str(info.value)
    assert "4 bad row(s)" in message and "on_bad_rows='skip'" in message
    assert f"{manifest}, line 3: image" in message and "not found" in message
    assert f"{manifest}, line 4: empty text" in message
    assert f"{manifest}, line 5: id 'a' repeats line 2" in message
    assert f"{manifest}, line 6: image" in message and "unreadable" in message


def test_bad_inputs_can_be_skipped_and_counted(tmp_path):
    folder = tmp_path / "posts"
    write_images(folder, 3)
    for i in (0, 2, 5):
        (folder / f"{i}.txt").write_text(f"tweet {i}")
    dm = synthetic(folder, on_bad_rows="skip")
    with pytest.warns(UserWarning, match=r"skipped 2 bad row\(s\); see .skipped_predict_rows"):
        dm.setup("predict")
    assert dm.datasets["predict"].ids == ["0", "2"]
    assert dm.skipped_predict_rows == [
        (str(folder / "1.jpg"), 0, "no text file 1.txt beside 1.jpg"),
        (str(folder / "5.txt"), 0, "no image 5.jpg beside 5.txt"),
    ]
    with pytest.raises(ManifestError, match=r"(?m)^  .*1\.jpg: no text file 1\.txt beside 1\.jpg$"):
        synthetic(folder).setup("predict")  # a pair of a folder has no line


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda tmp: None, ValueError, r"no inputs to predict on; pass predict=PATH"),
        (lambda tmp: tmp / "nothing.csv", FileNotFoundError, r"nothing.csv' does not exist"),
        (lambda tmp: write_csv(tmp / "x.xlsx", ["image", "text"], []), ValueError, r"unknown format '.xlsx'"),
        (lambda tmp: write_csv(tmp / "x.csv", ["picture", "text"], []), ValueError, r"lacks column\(s\) \['image'\]"),
        (lambda tmp: tmp, ValueError, r"holds no <id>.jpg / <id>.txt file"),
    ],
)
def test_missing_or_unusable_inputs_to_predict_on_are_refused(tmp_path, make, error, match):
    path = make(tmp_path)
    dm = SyntheticSentimentDataModule(image_size=32, predict=None if path is None else str(path))
    with pytest.raises(error, match=match):
        dm.setup("predict")


def test_preprocessing_describes_the_evaluation_pipeline():
    synthetic_data = SyntheticSentimentDataModule(image_size=48, image_model="tf_efficientnet_lite0", max_length=20)
    assert synthetic_data.preprocessing == {
        "image": {"input_size": [3, 48, 48], "interpolation": "bicubic", "mean": [0.5, 0.5, 0.5],
                  "std": [0.5, 0.5, 0.5], "crop_pct": 1.0, "crop_mode": "center"},
        "tokenizer": "all-MiniLM-L6-v2",
        "max_length": 20,
    }
    plain = SyntheticSentimentDataModule(image_size=32, tokenizer=None).preprocessing
    assert plain["image"]["mean"] == [0.0, 0.0, 0.0] and plain["tokenizer"] is None
