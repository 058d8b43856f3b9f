"""ml-optim-plugins predict, Predictor and PredictionWriter, on the checkpoint of the tiny quick start's fit."""

from __future__ import annotations

import csv
import shlex
from pathlib import Path

import lightning.pytorch as pl
import pytest
import yaml
from PIL import Image
from torch.utils.data import DataLoader

from ml_optim_plugins import (
    PredictionWriter,
    Predictor,
    SyntheticSentimentDataModule,
)
from ml_optim_plugins.data import SyntheticSentimentDataset
from ml_optim_plugins.prediction import Prediction
from ml_optim_plugins.cli import run

N = 7  # odd: under 2-process DDP the ranks get 4 and 3 samples
CLASSES = ["negative", "neutral", "positive"]
COLUMNS = ["id", "prediction", *(f"prob_{c}" for c in CLASSES), "image_prediction", "text_prediction"]


@pytest.fixture(scope="module")
def posts(tmp_path_factory) -> Path:
    """N test-split synthetic posts as files: ``posts/<i>.jpg`` + ``posts/<i>.txt``, and ``posts.csv`` (id, image,
    text; no label) listing them in another order."""
    root = tmp_path_factory.mktemp("new-posts")
    (root / "posts").mkdir()
    dataset = SyntheticSentimentDataset(N, image_size=32, split="test")
    for i in range(N):
        sample = dataset[i]
        pixels = (sample["image"].permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        Image.fromarray(pixels).save(root / "posts" / f"{i}.jpg")
        (root / "posts" / f"{i}.txt").write_text(sample["text"])
    order = [3, 0, 6, 1, 5, 2, 4]
    with (root / "posts.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "image", "text"])
        writer.writerows([f"post-{i}", f"posts/{i}.jpg", (root / "posts" / f"{i}.txt").read_text()] for i in order)
    return root


def manifest_pairs(posts: Path) -> list[tuple[str, str, str]]:
    """``(id, image path, text)`` of ``posts.csv``, in its order."""
    return [(row["id"], str(posts / row["image"]), row["text"]) for row in csv.DictReader((posts / "posts.csv").open())]


@pytest.fixture(scope="module")
def predictor(tiny_run) -> Predictor:
    return Predictor.from_checkpoint(tiny_run.checkpoint)


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows and list(rows[0]) == COLUMNS
    return rows


def probabilities(row: dict[str, str]) -> list[float]:
    return [float(row[f"prob_{c}"]) for c in CLASSES]


def predict_cli(*args: str) -> Path:
    """Run ``ml-optim-plugins predict ARGS`` in this process; the path of the predictions.csv it wrote."""
    cli = run(["predict", *args])
    (writer,) = [c for c in cli.trainer.callbacks if isinstance(c, PredictionWriter)]  # added by the command
    assert writer.path == Path(cli.trainer.log_dir) / "predictions.csv" and writer.count == N
    return writer.path


def test_cli_python_api_and_trainer_predict_agree_on_an_unlabelled_manifest(tiny_run, posts, predictor, tmp_path):
    written = predict_cli("-c", str(tiny_run.config), "--ckpt_path", str(tiny_run.checkpoint),
                          "--data.init_args.predict", str(posts / "posts.csv"))
    rows = read_rows(written)
    pairs = manifest_pairs(posts)
    assert [row["id"] for row in rows] == [post_id for post_id, _, _ in pairs]  # input order, each once

    # Python: from the checkpoint alone, image paths or PIL images, any batch size
    from_paths = predictor.predict([(image, text) for _, image, text in pairs], batch_size=3)
    from_pil = predictor.predict([(Image.open(image), text) for _, image, text in pairs])
    assert all(isinstance(p, Prediction) for p in from_paths)
    assert predictor.class_names == CLASSES and set(from_paths[0].modality_labels) == {"image", "text"}
    for row, by_path, by_pil in zip(rows, from_paths, from_pil):
        assert row["prediction"] == by_path.label == by_pil.label
        assert [row["image_prediction"], row["text_prediction"]] == list(by_path.modality_labels.values())
        assert probabilities(row) == pytest.approx(list(by_path.probabilities.values()), abs=2e-6)
        assert list(by_pil.probabilities.values()) == pytest.approx(list(by_path.probabilities.values()), abs=1e-6)

    # trainer.predict with the same data module arguments as the recipe, and Lightning's prediction writer
    data = SyntheticSentimentDataModule(image_size=32, batch_size=8, max_length=24, predict=str(posts / "posts.csv"))
    writer = PredictionWriter(tmp_path / "predictions.csv")
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[writer])
    outputs = trainer.predict(predictor.model, datamodule=data)
    probs = [p.tolist() for batch in outputs for p in batch["probs"]]
    assert [CLASSES[int(i)] for batch in outputs for i in batch["preds"]] == [row["prediction"] for row in rows]
    for row, p in zip(rows, probs):
        assert probabilities(row) == pytest.approx(p, abs=6e-7)
    assert writer.path.read_text() == written.read_text()


def test_fit_points_at_the_predict_command_which_runs_on_a_folder_of_posts(tiny_run, posts, predictor):
    (line,) = [line.strip() for line in tiny_run.printed.splitlines() if line.strip().startswith("ml-optim-plugins predict")]
    args = shlex.split(line)
    assert args[args.index("--ckpt_path") + 1] == str(tiny_run.checkpoint)
    assert args[args.index("-c") + 1] == str(tiny_run.checkpoint.parents[1] / "config.yaml")  # the run's own config
    assert args[-2:] == ["--data.init_args.predict", "POSTS"]
    written = predict_cli(*args[2:-1], str(posts / "posts"))
    rows = read_rows(written)
    assert [row["id"] for row in rows] == [str(i) for i in range(N)]  # <id>.jpg + <id>.txt, by id
    expected = predictor.predict([(posts / "posts" / f"{i}.jpg", (posts / "posts" / f"{i}.txt").read_text())
                                  for i in range(N)])
    assert [row["prediction"] for row in rows] == [p.label for p in expected]
    for row, p in zip(rows, expected):
        assert probabilities(row) == pytest.approx(list(p.probabilities.values()), abs=2e-6)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        (["--data.init_args.num_classes", "2"],
         r"labels \['negative', 'neutral', 'positive'\] in the checkpoint, \['negative', 'positive'\] in the data"),
        (["--data.init_args.image_size", "64"],
         r"preprocessing \(checkpoint vs data\): image input_size: \[3, 32, 32\] vs \[3, 64, 64\]"),
        # the encoder's own preprocessing, but not the one it was trained with
        (["--data.init_args.image_model", "test_resnet"], r"image mean: \[0.0, 0.0, 0.0\] vs \[0.5, 0.5, 0.5\]"),
        (["--data.init_args.max_length", "64"], r"max_length: 24 vs 64"),
    ],
)
def test_a_checkpoint_that_does_not_fit_the_data_is_refused(tiny_run, posts, override, match):
    with pytest.raises(ValueError, match=match) as info:
        run(["predict", "-c", str(tiny_run.config), "--ckpt_path", str(tiny_run.checkpoint),
             "--data.init_args.predict", str(posts / "posts.csv"), *override])
    message = str(info.value)
    assert f"checkpoint {str(tiny_run.checkpoint)!r} (trained on ml_optim_plugins.SyntheticSentimentDataModule)" in message
    assert f"-c {tiny_run.checkpoint.parents[1] / 'config.yaml'}, the config of its run" in message


def test_trainer_predict_refuses_a_model_that_does_not_fit_the_data_module(posts, predictor, tmp_path):
    """Outside the CLI: the writer compares the model's label names and preprocessing (a Predictor's model holds the
    checkpoint's) with the data module's at setup."""
    data = SyntheticSentimentDataModule(num_classes=2, image_size=64, max_length=24, predict=str(posts / "posts.csv"))
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                         callbacks=[PredictionWriter(tmp_path / "p.csv")])
    with pytest.raises(ValueError, match=r"MultimodalClassifier does not fit the data it is asked to predict on "
                                         r"\(SyntheticSentimentDataModule\): labels \['negative', 'neutral', 'positive'\] "
                                         r"in the model, \['negative', 'positive'\] in the data; preprocessing \(model vs "
                                         r"data\): image input_size: \[3, 32, 32\] vs \[3, 64, 64\]$"):
        trainer.predict(predictor.model, datamodule=data)
    assert not (tmp_path / "p.csv").exists()


def test_writer_refuses_more_processes_than_inputs(posts, predictor, tmp_path):
    """Lightning skips the predict loop of a process without inputs, which would leave the others waiting in the
    gather: refused at setup, on every process alike."""
    from types import SimpleNamespace

    folder = tmp_path / "one"
    folder.mkdir()
    (folder / "7.jpg").write_bytes((posts / "posts" / "0.jpg").read_bytes())
    (folder / "7.txt").write_text("a single post")
    data = SyntheticSentimentDataModule(image_size=32, max_length=24, predict=str(folder))
    data.setup("predict")
    writer = PredictionWriter(tmp_path / "p.csv")
    with pytest.raises(ValueError, match=r"1 input\(s\) to predict on for 2 processes: .*--trainer.devices 1\)"):
        writer.setup(SimpleNamespace(datamodule=data, world_size=2), predictor.model, "predict")
    writer.setup(SimpleNamespace(datamodule=data, world_size=1), predictor.model, "predict")


def test_two_process_ddp_predict_writes_each_sample_once_in_order(
    tiny_run, posts, predictor, run_ddp_cli, tmp_path
):
    config = yaml.safe_load(tiny_run.config.read_text())
    for logger in config["trainer"]["logger"]:
        logger["init_args"]["save_dir"] = str(tmp_path / "runs")
    (tmp_path / "ddp.yaml").write_text(yaml.safe_dump(config))
    # batch 2 of 7 samples: rank 0 gets 0, 2, 4, 6, rank 1 gets 1, 3, 5 (Lightning's sampler without repeats)
    run_ddp_cli(
        "predict", "-c", str(tmp_path / "ddp.yaml"), "--ckpt_path", str(tiny_run.checkpoint),
        "--data.init_args.predict", str(posts / "posts.csv"), "--data.init_args.batch_size", "2",
        "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu",
    )
    rows = read_rows(tmp_path / "runs" / "quickstart" / "version_0" / "predictions.csv")
    pairs = manifest_pairs(posts)
    assert [row["id"] for row in rows] == [post_id for post_id, _, _ in pairs]
    expected = predictor.predict([(image, text) for _, image, text in pairs])
    assert [row["prediction"] for row in rows] == [p.label for p in expected]
    for row, p in zip(rows, expected):
        assert probabilities(row) == pytest.approx(list(p.probabilities.values()), abs=2e-6)


def test_writer_orders_by_sample_index_and_writes_a_repeated_sample_once(posts, predictor, tmp_path):
    data = SyntheticSentimentDataModule(image_size=32, max_length=24, predict=str(posts / "posts.csv"))
    data.setup("predict")
    # a sampler that pads with repeats, as a DistributedSampler does, and serves out of order
    loader = DataLoader(data.datasets["predict"], batch_size=2, sampler=[4, 0, 2, 0, 4], collate_fn=data.collate)
    writer = PredictionWriter(tmp_path / "out" / "p.csv", modality_predictions=False, decimals=3)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[writer])
    trainer.predict(predictor.model, dataloaders=loader, return_predictions=False)
    with writer.path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["id"] for row in rows] == ["post-3", "post-6", "post-5"]  # positions 0, 2, 4 of posts.csv
    assert list(rows[0]) == ["id", "prediction", *(f"prob_{c}" for c in CLASSES)] and writer.count == 3
    assert all(len(row["prob_neutral"].split(".")[1]) == 3 for row in rows)


def test_writer_refuses_a_predict_step_without_indices(predictor, tmp_path):
    class NoIndex(pl.LightningModule):
        def predict_step(self, batch, batch_idx):
            return {"probs": batch.softmax(-1)}

    import torch

    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                         callbacks=[PredictionWriter(tmp_path / "p.csv")])
    with pytest.raises(ValueError, match=r"needs predict_step to return .*'index'.* got dict with keys \['probs'\]"):
        trainer.predict(NoIndex(), dataloaders=DataLoader(torch.randn(4, 3), batch_size=2))


def test_predictor_refuses_bad_samples_and_models_without_preprocessing(predictor, posts):
    image = posts / "posts" / "0.jpg"
    with pytest.raises(TypeError, match=r"sample 1 is 'just text'; give \(image path or PIL image, text\) pairs"):
        predictor.predict([(image, "fine"), "just text"])
    with pytest.raises(ValueError, match=r"sample 0: image '.*nope.jpg' cannot be read"):
        predictor.predict([(posts / "nope.jpg", "fine")])
    with pytest.raises(ValueError, match=r"sample 0: empty text"):
        predictor.predict([(image, "  ")])
    predictor.model.preprocessing = None
    try:
        with pytest.raises(ValueError, match=r"carries no preprocessing .* pass preprocessing=<data module>"):
            Predictor(predictor.model)
    finally:
        predictor.model.preprocessing = predictor.preprocessing
    data = SyntheticSentimentDataModule(image_size=32, max_length=24)
    again = Predictor(predictor.model, preprocessing=data.preprocessing, class_names=["neg", "neu", "pos"])
    assert again.predict([(image, "fine")])[0].label in {"neg", "neu", "pos"}


def test_predictor_loads_without_the_weights_the_recipe_started_from(tiny_run, tmp_path):
    """The quick start's image encoder starts from runs/pretrain_image/image-encoder.ckpt; a checkpoint of the
    classifier holds those weights, so the file may be gone when predicting."""
    import torch

    checkpoint = torch.load(tiny_run.checkpoint, map_location="cpu", weights_only=True)
    image = checkpoint["hyper_parameters"]["encoders"]["image"]["init_args"]
    image.update(checkpoint_path=str(tmp_path / "gone" / "image-encoder.ckpt"), checkpoint_prefix="encoders.image.")
    torch.save(checkpoint, tmp_path / "moved.ckpt")
    moved = Predictor.from_checkpoint(tmp_path / "moved.ckpt")
    for name, value in moved.model.state_dict().items():
        assert torch.equal(value, checkpoint["state_dict"][name]), name
    with pytest.raises(FileNotFoundError, match=r"checkpoint '.*missing.ckpt' does not exist"):
        Predictor.from_checkpoint(tmp_path / "missing.ckpt")
