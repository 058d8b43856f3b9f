from __future__ import annotations

import csv
import os
import warnings
from pathlib import Path
from unittest import mock

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger

from ml_optim_plugins.cli import main, run
from ml_optim_plugins.recipe_cli import ResumedMetricRows
from tests.conftest import gloo_threads


def last_value(metrics_csv: Path, column: str) -> float:
    rows = [row for row in csv.DictReader(metrics_csv.open()) if row.get(column)]
    assert rows, f"{column} never logged in {metrics_csv}"
    return float(rows[-1][column])


def test_fit_through_the_cli_leaves_one_complete_run_directory(tiny_config, tmp_path, capsys):
    cli = run(["fit", "-c", str(tiny_config), "--trainer.limit_train_batches", "2"])
    log_dir = Path(cli.trainer.log_dir)
    assert log_dir == tmp_path / "runs" / "quickstart" / "version_0"
    assert (log_dir / "config.yaml").is_file() and (log_dir / "metrics.csv").is_file()
    # RunReport from the recipe; fit tested the best checkpoint afterwards, so the report has its test column.
    report = (log_dir / "report.md").read_text()
    for plot in ("loss.png", "metrics.png", "lr.png"):
        assert (log_dir / plot).is_file() and f"]({plot})" in report
    assert "| fused |" in report and "| image |" in report and "test macro-F1" in report
    assert "test/f1" in cli.trainer.callback_metrics
    assert list(log_dir.glob("events.out.tfevents.*")), "TensorBoard events not in the run directory"
    assert not (log_dir.parent / "version_1").exists()
    assert 0.0 <= last_value(log_dir / "metrics.csv", "val/acc") <= 1.0
    assert last_value(log_dir / "metrics.csv", "val/image/acc") >= 0.0
    # WarmupDecay from the recipe: 2 optimizer steps, 1 of warmup; one LR column per named param group. In the
    # recipe's probe stage the encoders are gated (LR 0); the text encoder is split where its top two layers start.
    warmup = next(c for c in cli.trainer.callbacks if type(c).__name__ == "WarmupDecay")
    assert (warmup.resolved.total_steps, warmup.resolved.warmup_steps) == (2, 1)
    rows = list(csv.DictReader((log_dir / "metrics.csv").open()))
    groups = sorted(key.removeprefix("lr-AdamW/") for key in rows[0] if key.startswith("lr-AdamW/"))
    assert groups == ["encoders.image", "encoders.text/finetune", "encoders.text/frozen", "fusion"]
    head_lr = cli.trainer.optimizers[0].defaults["lr"]  # the recipe's AdamW lr, reached after the one warmup step
    for group in groups:
        lrs = [float(row[f"lr-AdamW/{group}"]) for row in rows if row.get(f"lr-AdamW/{group}")]
        assert lrs == pytest.approx([0.0, head_lr if group == "fusion" else 0.0]), group
    best = Path(cli.trainer.checkpoint_callback.best_model_path)
    assert best.is_file() and best.parent == log_dir / "checkpoints"
    checkpoint = torch.load(best, map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 2 and checkpoint["hyper_parameters"]["num_classes"] == 3
    assert cli.model.hparams.class_names == ("negative", "neutral", "positive")
    printed = capsys.readouterr().out
    assert "val/acc" in printed and "best checkpoint" in printed and str(best.name) in printed


class FailsAtTrainStart(Callback):
    def on_train_start(self, trainer, pl_module):
        raise RuntimeError("fails at the train start")


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return [{key: value for key, value in row.items() if value != ""} for row in csv.DictReader(handle)]


class CorruptSamples(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> torch.Tensor:
        raise RuntimeError("corrupt sample")


class FailingFit(pl.LightningModule):
    """Fails in prepare_data (before the CSV writer opens the run directory) or loading its first batch."""

    def __init__(self, where: str) -> None:
        super().__init__()
        self.where, self.layer = where, torch.nn.Linear(1, 1)

    def prepare_data(self):
        if self.where == "prepare_data":
            raise OSError("download failed (offline)")

    def training_step(self, batch, batch_idx):
        return self.layer(batch).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(CorruptSamples(), batch_size=2)


class LogsAtEpochStart(Callback):  # as StagedFinetuning's stage log or LearningRateMonitor(logging_interval="epoch")
    def on_train_epoch_start(self, trainer, pl_module):
        for logger in trainer.loggers:
            logger.log_metrics({"finetuning/stage": 1.0}, step=2)


@pytest.mark.parametrize(("where", "error", "added"), [
    ("prepare_data", OSError, []),
    ("first batch", RuntimeError, [{"finetuning/stage": "1.0", "step": "2"}]),
])
def test_a_resumed_fit_that_fails_before_its_first_batch_keeps_the_runs_metrics(tmp_path, where, error, added):
    """Lightning's CSV writer deletes metrics.csv when it opens the run directory; the carried rows are handed back
    to it and written, once each, before what the failed run logged, and the run's own error comes through."""
    logger = CSVLogger(tmp_path, name="run", version=0)
    metrics = Path(logger.log_dir) / "metrics.csv"
    metrics.parent.mkdir(parents=True)
    metrics.write_text("epoch,step,train/loss\n0,0,1.5\n0,1,1.2\n")
    history = _csv_rows(metrics)
    trainer = pl.Trainer(accelerator="cpu", logger=logger, callbacks=[ResumedMetricRows(logger), LogsAtEpochStart()],
                         max_epochs=1, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    with pytest.raises(error):
        trainer.fit(FailingFit(where))
    assert _csv_rows(metrics) == history + added


def test_resuming_continues_in_the_checkpoints_run_directory(tiny_config, tmp_path):
    """Resume from version_0's last.ckpt: the same directory (no version_1), ModelCheckpoint keeps its best score
    across the resume, and the report covers both sessions."""
    first = run(["fit", "-c", str(tiny_config), "--trainer.limit_train_batches", "1", "--test_after_fit", "false"])
    best_before = float(first.trainer.checkpoint_callback.best_model_score)
    last = str(Path(first.trainer.log_dir) / "checkpoints" / "last.ckpt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = run(["fit", "-c", str(tiny_config), "--trainer.limit_train_batches", "1", "--trainer.max_epochs",
                       "2", "--ckpt_path", last, "--test_after_fit", "false"])
        left = [f for f in warnings.filters if f[1] is not None and "not empty" in f[1].pattern]
    assert not [str(w.message) for w in caught if "exists and is not empty" in str(w.message)]  # it must hold them
    assert not left  # quiet for that fit only
    resumed.instantiate_trainer()  # a subclass may build a second trainer for the same resume: one filter, ended once
    resumed.instantiate_trainer()
    resumed._end_quiet_resume()
    assert not [f for f in warnings.filters if f[1] is not None and "not empty" in f[1].pattern]
    run_dir = tmp_path / "runs" / "quickstart"
    metrics = run_dir / "version_0" / "metrics.csv"
    history = _csv_rows(metrics)
    with pytest.raises(ValueError, match="batch_size"):  # refused before training, after the filter was set
        run(["fit", "-c", str(tiny_config), "--ckpt_path", last, "--data.init_args.batch_size", "3"])
    assert not [f for f in warnings.filters if f[1] is not None and "not empty" in f[1].pattern]  # nor after a failure
    assert _csv_rows(metrics) == history  # the run's metrics survive a refused resume
    with pytest.raises(RuntimeError, match="fails at the train start"):  # the writer has opened the directory
        run(["fit", "-c", str(tiny_config), "--ckpt_path", last, "--trainer.max_epochs", "3",
             "--trainer.callbacks+=tests.test_cli.FailsAtTrainStart"])
    assert _csv_rows(metrics) == history  # and a resumed fit that fails before its first batch
    assert Path(resumed.trainer.log_dir) == run_dir / "version_0" and not (run_dir / "version_1").exists()
    checkpoint = resumed.trainer.checkpoint_callback
    scores = [float(row["val/f1"]) for row in csv.DictReader((run_dir / "version_0" / "metrics.csv").open())
              if row.get("val/f1")]
    assert len(scores) == 2 and float(checkpoint.best_model_score) == pytest.approx(max(scores), abs=1e-6)
    assert float(checkpoint.best_model_score) >= best_before
    report = (run_dir / "version_0" / "report.md").read_text()
    assert "fit: 2 epoch(s), 2 optimizer step(s)" in report


@pytest.mark.parametrize("enabled", [False, True])
def test_the_progress_bar_flag_overrides_the_recipes_progress_bar_callback(tiny_config, enabled):
    """The shipped recipes list RichProgressBar among their callbacks; --trainer.enable_progress_bar false takes it
    out (Lightning refuses the combination) and true keeps it."""
    from lightning.pytorch.callbacks import ProgressBar, RichProgressBar

    config = yaml.safe_load(tiny_config.read_text())
    config["trainer"]["callbacks"].append({"class_path": "lightning.pytorch.callbacks.RichProgressBar"})
    tiny_config.write_text(yaml.safe_dump(config))
    cli = run(["fit", "-c", str(tiny_config), "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
               "--test_after_fit", "false", "--trainer.enable_progress_bar", str(enabled).lower()])
    bars = [c for c in cli.trainer.callbacks if isinstance(c, ProgressBar)]
    assert [type(c) for c in bars] == ([RichProgressBar] if enabled else [])
    assert cli.trainer.global_step == 1


def test_validate_from_a_fit_checkpoint(tiny_config, capsys):
    cli = run(["fit", "-c", str(tiny_config), "--trainer.limit_train_batches", "1"])
    best = cli.trainer.checkpoint_callback.best_model_path
    capsys.readouterr()
    validated = run(["validate", "-c", str(tiny_config), "--ckpt_path", best])
    assert "val/acc" in validated.trainer.callback_metrics
    assert "final metrics" in capsys.readouterr().out


def test_quickstart_recipe_parses_with_all_library_classes(tmp_path):
    config = yaml.safe_load((Path(__file__).parents[1] / "recipes" / "quickstart.yaml").read_text())
    assert config["data"]["class_path"] == "ml_optim_plugins.SyntheticSentimentDataModule"
    assert set(config["model"]["init_args"]["encoders"]) == {"image", "text"}
    callbacks = {c["class_path"].rsplit(".", 1)[-1] for c in config["trainer"]["callbacks"]}
    assert {"WarmupDecay", "GradientCheck", "RunReport", "LearningRateMonitor", "ModelCheckpoint"} <= callbacks


def test_unknown_config_key_is_rejected_before_training(tiny_config, capsys):
    with pytest.raises(SystemExit):
        run(["fit", "-c", str(tiny_config), "--model.init_args.no_such_option", "3"])
    assert "no_such_option" in capsys.readouterr().err


@pytest.mark.ddp
def test_two_process_ddp_fit_on_cpu(tiny_config, run_cli_subprocess, tmp_path):
    # 32 samples, batch 8, 2 processes: each rank sees 16 samples, so an epoch is 2 optimizer steps, not 4.
    result = run_cli_subprocess(
        "fit", "-c", str(tiny_config), "--trainer.devices", "2", "--trainer.strategy", "ddp",
        "--trainer.accelerator", "cpu",
    )
    assert "best checkpoint" in result.stdout
    log_dir = tmp_path / "runs" / "quickstart" / "version_0"
    checkpoint = torch.load(next((log_dir / "checkpoints").glob("best-*.ckpt")), map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 2
    assert 0.0 <= last_value(log_dir / "metrics.csv", "val/acc") <= 1.0


def test_a_ddp_run_ends_with_its_process_group_destroyed(tiny_config, tmp_path, monkeypatch):
    """A gloo group left to interpreter shutdown can abort the process after a successful fit (SIGABRT, "terminate
    called without an active exception", pytorch/pytorch#190489); main() destroys it. One in-process rank is enough."""
    import torch.distributed as dist

    monkeypatch.chdir(tmp_path)
    with mock.patch.dict(os.environ):  # Lightning's launcher sets MASTER_PORT, LOCAL_RANK, ... for its processes
        main(["fit", "-c", str(tiny_config), "--trainer.devices", "1", "--trainer.strategy", "ddp",
              "--trainer.accelerator", "cpu", "--trainer.limit_train_batches", "1", "--test_after_fit", "false"])
    assert (tmp_path / "runs" / "quickstart" / "version_0" / "checkpoints").is_dir()
    assert not dist.is_initialized()
    assert gloo_threads() == []


def test_gaussian_dropout_variant_stacks_on_the_recipe(tiny_config, tmp_path, monkeypatch):
    from ml_optim_plugins import GaussianDropout, ModalityDropout

    monkeypatch.chdir(tmp_path)
    variant = Path(__file__).parents[1] / "recipes" / "variants" / "gaussian_dropout.yaml"
    cli = run(["fit", "-c", str(tiny_config), "-c", str(variant), "--trainer.limit_train_batches", "1"])
    assert isinstance(cli.model.fusion.dropout, GaussianDropout) and cli.model.fusion.dropout.p == 0.3
    assert isinstance(cli.model.modality_dropout, ModalityDropout) and cli.model.modality_dropout.p == 0.2
    assert Path(cli.trainer.log_dir).resolve() == tmp_path / "runs" / "quickstart-gaussian-dropout" / "version_0"
    assert cli.trainer.global_step == 1


def test_pretrain_image_then_staged_quick_start(tiny_config, tmp_path):
    """The README's pipeline on tiny data: recipes/pretrain_image.yaml saves the image encoder, the quick start loads
    it, probes with both encoders frozen (cached features), then finetunes the image encoder and the top text layers."""
    from ml_optim_plugins import LinearProbeFinetune, TimmImageEncoder

    pretrain = yaml.safe_load((Path(__file__).parents[1] / "recipes" / "pretrain_image.yaml").read_text())
    pretrain["model"]["init_args"]["encoders"]["image"]["init_args"]["model_name"] = "test_resnet"
    pretrain["data"]["init_args"].update(train_size=32, val_size=16, test_size=16, image_size=32, batch_size=8)
    pretrain["trainer"].update(max_epochs=1, accelerator="cpu", enable_model_summary=False)
    pretrain["trainer"]["logger"][0]["init_args"]["save_dir"] = str(tmp_path / "runs")
    callbacks = [c for c in pretrain["trainer"]["callbacks"] if not c["class_path"].endswith("RichProgressBar")]
    for checkpoint in (c for c in callbacks if c["class_path"].endswith("ModelCheckpoint")):
        checkpoint["init_args"]["dirpath"] = str(tmp_path)  # image-encoder.ckpt and last.ckpt
    pretrain["trainer"]["callbacks"] = callbacks
    (tmp_path / "pretrain.yaml").write_text(yaml.safe_dump(pretrain))
    run(["fit", "-c", str(tmp_path / "pretrain.yaml")])
    weights = tmp_path / "image-encoder.ckpt"
    saved = torch.load(weights, map_location="cpu", weights_only=False)["state_dict"]

    config = yaml.safe_load(tiny_config.read_text())
    config["model"]["init_args"]["encoders"]["image"]["init_args"].update(
        checkpoint_path=str(weights), checkpoint_prefix="encoders.image."
    )
    config["trainer"]["max_epochs"] = 3
    plan = next(c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("LinearProbeFinetune"))
    plan["init_args"]["probe_epochs"] = 2
    tiny_config.write_text(yaml.safe_dump(config))
    loaded = TimmImageEncoder("test_resnet", checkpoint_path=weights, checkpoint_prefix="encoders.image.")
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, saved[f"encoders.image.{name}"]), name

    cli = run(["fit", "-c", str(tiny_config), "--test_after_fit", "false"])  # keep the last weights to compare
    staged = next(c for c in cli.trainer.callbacks if isinstance(c, LinearProbeFinetune))
    assert [(b["name"], b["epoch"]) for b in staged.boundaries] == [("probe", 0), ("finetune", 2)]
    # 32 train and 16 val samples: the sanity check and epoch 0 computed them once; epoch 0's validation (after the
    # sanity check) and all of epoch 1 were served from the cache.
    assert staged.cache.stats()["text"] == {"hits": 16 + 32 + 16, "misses": 32 + 16}
    final = cli.model.encoders["image"].state_dict()
    assert any(not torch.equal(final[k], loaded.state_dict()[k]) for k in final)  # finetuned after the probe
    with pytest.raises(RuntimeError, match="has no key under 'encoders.audio.'"):
        TimmImageEncoder("test_resnet", checkpoint_path=weights, checkpoint_prefix="encoders.audio.")


def test_staged_finetuning_stages_from_yaml(tiny_config):
    """A plan written as YAML in a recipe becomes Stage objects (LightningCLI / jsonargparse)."""
    from ml_optim_plugins import Stage, StagedFinetuning

    config = yaml.safe_load(tiny_config.read_text())
    callbacks = [c for c in config["trainer"]["callbacks"] if not c["class_path"].endswith("LinearProbeFinetune")]
    callbacks.insert(0, {"class_path": "ml_optim_plugins.StagedFinetuning", "init_args": {"stages": [
        {"name": "probe"},
        {"name": "top", "start_step": 1, "trainable": ["text[-1]", "image"], "lr_multipliers": {"text": 0.5},
         "warmup_steps": 1},
    ]}})
    config["trainer"]["callbacks"] = callbacks
    tiny_config.write_text(yaml.safe_dump(config))
    cli = run(["fit", "-c", str(tiny_config), "--trainer.limit_train_batches", "2"])
    staged = next(c for c in cli.trainer.callbacks if isinstance(c, StagedFinetuning))
    assert staged.stages == [Stage(name="probe"), Stage(name="top", start_step=1, trainable=["text[-1]", "image"],
                                                        lr_multipliers={"text": 0.5}, warmup_steps=1)]
    assert [(b["name"], b["step"]) for b in staged.boundaries] == [("probe", 0), ("top", 1)]


@pytest.fixture(scope="module")
def lite0_imagenet():
    from ml_optim_plugins import TimmImageEncoder

    return TimmImageEncoder("tf_efficientnet_lite0", pretrained="packaged")


@pytest.mark.parametrize(
    ("image_model", "match"),
    [
        (None, r"pretrained='packaged' weights.*set data.init_args.image_model: tf_efficientnet_lite0"),
        ("resnet18", r"image_model='resnet18' \(mean \(0.485, 0.456, 0.406\) instead of \(0.5, 0.5, 0.5\)"),
        ("tf_efficientnet_lite0", None),
        ("tf_efficientnet_lite2", None),  # another size, same preprocessing
    ],
)
def test_data_must_prepare_images_for_the_pretrained_encoder(lite0_imagenet, image_model, match):
    from types import SimpleNamespace

    from ml_optim_plugins.cli import check_image_preprocessing

    model, data = SimpleNamespace(encoders={"image": lite0_imagenet}), SimpleNamespace(hparams={"image_model": image_model})
    if match is None:
        check_image_preprocessing(model, data)
    else:
        with pytest.raises(ValueError, match=match):
            check_image_preprocessing(model, data)


def test_a_randomly_initialised_encoder_takes_any_preprocessing():
    from types import SimpleNamespace

    from ml_optim_plugins import TimmImageEncoder
    from ml_optim_plugins.cli import check_image_preprocessing

    model = SimpleNamespace(encoders={"image": TimmImageEncoder("test_resnet")})
    check_image_preprocessing(model, SimpleNamespace(hparams={"image_model": None}))
    check_image_preprocessing(model, SimpleNamespace(hparams={}))


def test_final_table_prints_small_learning_rates_readably(capsys):
    import types

    from ml_optim_plugins.cli import print_run_summary

    metrics = {"lr-AdamW/fusion": torch.tensor(3e-05), "val/acc": torch.tensor(0.8125),
               "lr-AdamW/frozen": torch.tensor(0.0)}
    trainer = types.SimpleNamespace(callback_metrics=metrics, log_dir=None, is_global_zero=True,
                                    checkpoint_callback=None)
    print_run_summary(trainer, "fit")
    rows = {line.split()[1]: line.split()[3] for line in capsys.readouterr().out.splitlines() if line.count("│") == 3}
    assert rows == {"lr-AdamW/fusion": "3.000e-05", "val/acc": "0.8125", "lr-AdamW/frozen": "0.0000"}  # issue 17
