from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from jsonargparse import ArgumentParser
from lightning.pytorch.loggers import CSVLogger

from ml_optim_plugins import (
    MultimodalDataModule,
    MVSADataModule,
)
from ml_optim_plugins.data import ManifestError, clean_mvsa_labels, read_mvsa
from tests.data.mvsa_fixture import write_mvsa, write_mvsa_samples

REPO = Path(__file__).resolve().parents[2]
VARIANTS = ["single", "multiple"]
POS, NEU, NEG = "positive", "neutral", "negative"


def make_dm(root: Path, **kwargs) -> MVSADataModule:
    return MVSADataModule(str(root), image_size=16, batch_size=4, max_length=16, **kwargs)


@pytest.mark.parametrize(
    ("text", "image", "expected"),
    [
        (POS, POS, (POS, None)),
        (NEU, NEU, (NEU, None)),
        (NEG, NEG, (NEG, None)),
        (NEU, POS, (POS, None)),
        (POS, NEU, (POS, None)),
        (NEU, NEG, (NEG, None)),
        (NEG, NEU, (NEG, None)),
        (POS, NEG, (None, "conflict")),
        (NEG, POS, (None, "conflict")),
    ],
)
def test_one_annotator_pair_rule(text, image, expected):
    assert clean_mvsa_labels([(text, image)]) == expected


@pytest.mark.parametrize(
    ("pairs", "expected"),
    [
        ([(POS, POS), (POS, POS), (POS, POS)], (POS, None)),  # unanimous
        ([(NEG, NEU), (NEG, NEU), (POS, NEG)], (NEG, None)),  # 2-of-3 text negative, 2-of-3 image neutral
        ([(NEU, POS), (NEU, NEG), (POS, POS)], (POS, None)),  # text neutral, image positive
        ([(NEU, NEU), (NEU, POS), (NEG, NEU)], (NEU, None)),  # both neutral by majority
        ([(POS, NEG), (POS, NEG), (NEU, NEU)], (None, "conflict")),  # majorities positive vs negative
        ([(POS, POS), (NEU, POS), (NEG, POS)], (None, "no_majority")),  # text: one vote each
        ([(POS, POS), (POS, NEU), (POS, NEG)], (None, "no_majority")),  # image: one vote each
    ],
)
def test_three_annotators_majority_then_pair_rule(pairs, expected):
    assert clean_mvsa_labels(pairs) == expected


def test_cleaning_rejects_unknown_labels_and_no_pairs():
    with pytest.raises(ValueError, match=r"unknown MVSA label\(s\) \['happy'\]"):
        clean_mvsa_labels([("happy", POS)])
    with pytest.raises(ValueError, match="no \\(text, image\\) label pairs"):
        clean_mvsa_labels([])


# Hand-written label lines and what cleaning makes of them: (samples, labels of the kept IDs, dropped counts).
HAND_WRITTEN = {
    "single": (
        [[(POS, POS)], [(NEU, NEG)], [(NEG, NEU)], [(POS, NEG)], [(NEU, NEU)], [(NEG, POS)], [(POS, NEU)]],
        {1: POS, 2: NEG, 3: NEG, 5: NEU, 7: POS},
        {"conflict": 2, "no_majority": 0},
    ),
    "multiple": (
        [
            [(POS, POS), (POS, NEU), (NEU, POS)],
            [(NEG, NEU), (NEG, NEU), (POS, NEG)],
            [(POS, NEG), (NEG, POS), (NEU, NEU)],
            [(POS, NEG), (POS, NEG), (NEU, NEU)],
            [(NEU, NEU), (NEU, NEU), (NEU, NEU)],
            [(NEG, NEG), (NEU, POS), (POS, NEU)],
            [(NEU, NEG), (NEU, NEG), (NEU, POS)],
        ],
        {1: POS, 2: NEG, 5: NEU, 7: NEG},
        {"conflict": 1, "no_majority": 2},
    ),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_read_mvsa_keeps_cleans_and_counts(tmp_path, variant):
    samples, kept, dropped = HAND_WRITTEN[variant]
    rows, counts = read_mvsa(write_mvsa_samples(tmp_path, samples))
    assert {int(row.image.stem): row.label for row in rows} == kept
    assert all(row.line == int(row.image.stem) + 1 and row.text and not row.problem for row in rows)
    assert counts == {
        "variant": variant,
        "samples": 7,
        "kept": {label: sum(1 for k in kept.values() if k == label) for label in (NEG, NEU, POS)},
        "dropped": dropped,
        "bad_rows": 0,
    }


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_is_detected_and_a_contradicting_one_is_an_error(tmp_path, variant):
    root = write_mvsa(tmp_path, n=10, variant=variant)
    other = "multiple" if variant == "single" else "single"
    assert read_mvsa(root)[1]["variant"] == read_mvsa(root, variant)[1]["variant"] == variant
    expected = f"variant='{other}', but .*labelResultAll.txt is MVSA-{variant.capitalize()}"
    with pytest.raises(ValueError, match=expected):
        read_mvsa(root, other)
    with pytest.raises(ValueError, match=expected):
        make_dm(root, variant=other)


def test_bad_header_unknown_variant_and_missing_label_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="labelResultAll.txt' does not exist"):
        read_mvsa(tmp_path)
    (tmp_path / "labelResultAll.txt").write_text("ID\ttext,image\ttext,image\n1\tpositive,positive\n")
    with pytest.raises(ValueError, match="line 1: expected the header"):
        read_mvsa(tmp_path)
    with pytest.raises(ValueError, match="variant='both'"):
        read_mvsa(tmp_path, "both")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="give the MVSA labels"):
        make_dm(tmp_path, labels=["negative", "positive"])


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("suffix", "message"), [("jpg", "image '{}' not found"), ("txt", "text file '{}' not found")])
def test_missing_file_raises_with_file_and_line_or_is_skipped(tmp_path, variant, suffix, message):
    root = write_mvsa(tmp_path, variant=variant)
    missing = root / "data" / f"1.{suffix}"
    missing.unlink()
    with pytest.raises(ManifestError) as info:
        make_dm(root)
    ((file, line, problem),) = info.value.problems
    assert (Path(file).name, line, problem) == ("labelResultAll.txt", 2, message.format(missing))
    assert "labelResultAll.txt, line 2" in str(info.value)
    with pytest.warns(UserWarning, match="MVSADataModule skipped 1 bad row"):
        dm = make_dm(root, on_bad_rows="skip")
    kept = [row for rows in dm.splits.values() for row in rows]
    assert all(row.line != 2 for row in kept) and len(kept) == (35 if variant == "single" else 31)
    assert dm.cleaning["bad_rows"] == 1 and sum(dm.cleaning["kept"].values()) == len(kept)


def test_malformed_lines_are_reported_with_their_line(tmp_path):
    root = write_mvsa_samples(tmp_path, [[(POS, POS)], [(NEG, NEU)], [(NEU, NEU)]])
    with (root / "labelResultAll.txt").open("a") as handle:
        handle.write("4\tpositive\n5\thappy,positive\n6\tpositive,positive\tneutral,neutral\n2\tneutral,neutral\n")
    rows, counts = read_mvsa(root)
    problems = {row.line: row.problem for row in rows if row.problem}
    assert problems == {
        5: "'positive' is not a 'text,image' label pair",
        6: "unknown label 'happy'; known labels are ['negative', 'neutral', 'positive']",
        7: "expected 2 tab-separated columns, got 3",
        8: "duplicate ID '2' (first on line 3)",
    }
    assert counts["bad_rows"] == 4 and counts["samples"] == 7
    with pytest.raises(ManifestError) as info:
        make_dm(root)
    assert [line for _, line, _ in info.value.problems] == [5, 6, 7, 8]


def test_latin1_and_utf8_texts_are_read(tmp_path):
    root = write_mvsa(tmp_path, n=10)
    with pytest.raises(UnicodeDecodeError):
        (root / "data" / "3.txt").read_text(encoding="utf-8")
    texts = {int(row.image.stem): row.text for row in read_mvsa(root)[0]}
    assert "at the café was" in texts[3] and texts[1].startswith("RT @user1: ") and texts[1] == texts[1].strip()


@pytest.mark.parametrize(("variant", "sizes"), [("single", (28, 4, 4)), ("multiple", (26, 3, 3))])
def test_seeded_8_1_1_split_is_deterministic_disjoint_and_complete(tmp_path, variant, sizes):
    root = write_mvsa(tmp_path, variant=variant)
    ids = {split: [row.image.stem for row in rows] for split, rows in make_dm(root).splits.items()}
    assert (len(ids["train"]), len(ids["val"]), len(ids["test"])) == sizes
    assert ids == {split: [row.image.stem for row in rows] for split, rows in make_dm(root).splits.items()}
    assert len(set().union(*ids.values())) == sum(sizes) == sum(read_mvsa(root)[1]["kept"].values())
    for split, rows in make_dm(root).splits.items():  # the fixture's promise to DDP tests
        assert {row.label for row in rows} == {NEG, NEU, POS}, split
    other = make_dm(root, split_seed=1).splits
    assert [row.image.stem for row in other["val"]] != ids["val"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_labels_and_cleaning_counts_are_written_to_the_log_dir(tmp_path, variant):
    dm = make_dm(write_mvsa(tmp_path / "mvsa", variant=variant), labels=[POS, NEU, NEG])
    dm.trainer = pl.Trainer(logger=CSVLogger(tmp_path / "runs"), accelerator="cpu", enable_progress_bar=False)
    dm.setup("fit")
    log_dir = tmp_path / "runs" / "lightning_logs" / "version_0"
    assert json.loads((log_dir / "labels.json").read_text()) == [POS, NEU, NEG]
    written = json.loads((log_dir / "mvsa_cleaning.json").read_text())
    assert written == dm.cleaning and written["variant"] == variant
    assert written["dropped"] == {"conflict": 4, "no_majority": 4 if variant == "multiple" else 0}
    assert written["samples"] == 40 == sum(written["kept"].values()) + sum(written["dropped"].values())
    assert dm.state_dict() == {"class_names": [POS, NEU, NEG]}


def test_train_batch_has_images_tokens_labels_and_index(tmp_path):
    dm = make_dm(write_mvsa(tmp_path))
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 16, 16) and batch["image"].dtype == torch.float32
    assert batch["text"]["input_ids"].shape[0] == 4 and batch["text"]["input_ids"].shape[1] <= 16
    assert batch["label"].dtype == torch.long and set(batch["label"].tolist()) <= {0, 1, 2}
    assert len(batch["index"]) == 4 and all(0 <= int(i) < 28 for i in batch["index"])


def docs_section() -> str:
    text = (REPO / "docs" / "data.md").read_text()
    return text[text.index("## MVSA-Single / MVSA-Multiple"):]


def test_docs_yaml_builds_the_data_module(tmp_path, monkeypatch):
    import yaml

    monkeypatch.chdir(tmp_path)
    (block,) = re.findall(r"```yaml\n(.*?)```", docs_section(), flags=re.S)
    config = yaml.safe_load(block)
    write_mvsa(Path(config["data"]["init_args"]["root"]), variant="multiple")
    parser = ArgumentParser()
    parser.add_subclass_arguments(MultimodalDataModule, "data")
    dm = parser.instantiate_classes(parser.parse_object(config)).data
    assert isinstance(dm, MVSADataModule) and dm.cleaning["variant"] == "multiple"


def test_docs_python_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_mvsa(tmp_path / "data" / "MVSA_Single")
    (block,) = re.findall(r"```python\n(.*?)```", docs_section(), flags=re.S)
    exec(compile(block, "docs/data.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "{'conflict': 4, 'no_majority': 0}" in printed and "positive" in printed


def test_nothing_is_written_for_a_trainer_without_loggers(tmp_path, monkeypatch):
    import lightning.pytorch as pl

    from ml_optim_plugins import MVSADataModule

    monkeypatch.chdir(tmp_path)
    data = MVSADataModule(str(write_mvsa(tmp_path / "mvsa", n=20)), image_size=16, batch_size=8, max_length=16)
    data.trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    data.setup("fit")
    assert not (tmp_path / "labels.json").exists() and not (tmp_path / "mvsa_cleaning.json").exists()
