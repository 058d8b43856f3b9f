"""Every recipe composes the library's techniques and trains, shrunk to tiny data, with 2-process DDP on CPU."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel

from ml_optim_plugins.data import read_mvsa
from tests.data.mvsa_fixture import write_mvsa

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TRAINING_RECIPES = ["quickstart", "mvsa_single", "mvsa_multiple", "manifest"]


def callbacks_of(config: dict) -> dict[str, dict]:
    """Each callback's init_args by class name (of the recipes' two ModelCheckpoints, the one that selects the model)."""
    callbacks = {c["class_path"].rsplit(".", 1)[-1]: c.get("init_args", {}) for c in config["trainer"]["callbacks"]}
    return {**callbacks, "ModelCheckpoint": next(c for c in checkpoints_of(config) if c.get("monitor") != "step")}


def checkpoints_of(config: dict) -> list[dict]:
    return [c.setdefault("init_args", {}) for c in config["trainer"]["callbacks"] if c["class_path"].endswith(
        "ModelCheckpoint")]


@pytest.mark.parametrize("name", TRAINING_RECIPES)
def test_recipe_composes_every_technique(name):
    """Gradient check at the start, warmup + cosine, staged finetuning, OGM-GE, Gaussian dropout in the head, early
    stopping and the best checkpoint on validation macro-F1, a run report."""
    config = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())
    callbacks = callbacks_of(config)
    assert callbacks["GradientCheck"].get("every_n_epochs") in (None, 2)  # always includes the first batch
    assert callbacks["WarmupDecay"]["decay"] == "cosine"
    assert callbacks["LinearProbeFinetune"]["probe_epochs"] >= 1
    assert callbacks["ModalityBalancer"]["method"] == "ogm_ge"
    for selection in ("ModelCheckpoint", "EarlyStopping"):
        assert (callbacks[selection]["monitor"], callbacks[selection]["mode"]) == ("val/f1", "max"), selection
    # Patience restarts at the unfreeze (StagedFinetuning(reset_early_stopping=True), the default).
    assert callbacks["LinearProbeFinetune"].get("reset_early_stopping", True)
    assert "RunReport" in callbacks
    dropout = config["model"]["init_args"]["fusion"]["init_args"]["dropout"]
    assert dropout["class_path"] == "ml_optim_plugins.GaussianDropout"


class _WorseEachEpoch(BoringModel):
    """Validation metrics that peak at epoch 0: no checkpoint after it is a best one."""

    def validation_step(self, batch, batch_idx):
        self.log_dict({"val/f1": -float(self.current_epoch), "val/acc": -float(self.current_epoch)})
        return super().validation_step(batch, batch_idx)


@pytest.mark.parametrize("name", [*TRAINING_RECIPES, "pretrain_image"])
def test_last_ckpt_holds_the_latest_epoch_after_validation_stops_improving(name, tmp_path):
    """A run resumed from checkpoints/last.ckpt continues from its latest epoch, not from its best: Lightning >= 2.6
    writes save_last's last.ckpt only beside a new best, so the recipes keep it with a ModelCheckpoint of its own,
    monitoring ``step``, which leaves room for a user's unmonitored every-epoch ModelCheckpoint (Lightning refuses two
    with the same trigger), and which a resumed run restores."""
    config = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())

    def callbacks():
        every_epoch = ModelCheckpoint(dirpath=tmp_path / "every", filename="{epoch}", save_top_k=-1)
        return [*(ModelCheckpoint(**{**args, "dirpath": tmp_path}) for args in checkpoints_of(config)), every_epoch]

    def fit(max_epochs, ckpt_path=None):
        trainer = pl.Trainer(max_epochs=max_epochs, callbacks=callbacks(), limit_train_batches=2, limit_val_batches=1,
                             logger=False, enable_progress_bar=False, enable_model_summary=False,
                             default_root_dir=tmp_path)
        trainer.fit(_WorseEachEpoch(), ckpt_path=ckpt_path)
        return trainer

    trainer = fit(3)
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["epoch"] == 2
    best = trainer.checkpoint_callback  # the first, monitoring validation: test-after-fit and the report use its best
    assert best.monitor in ("val/f1", "val/acc") and torch.load(best.best_model_path, weights_only=False)["epoch"] == 0
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == sorted(["last.ckpt", Path(best.best_model_path).name])
    assert sorted(p.name for p in (tmp_path / "every").glob("*.ckpt")) == ["epoch=0.ckpt", "epoch=1.ckpt", "epoch=2.ckpt"]
    resumed = fit(4, ckpt_path=tmp_path / "last.ckpt")
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["epoch"] == 3
    assert resumed.checkpoint_callback.best_model_path == best.best_model_path  # the restored selection


def write_manifest(root: Path) -> Path:
    """A CSV manifest of the clean samples of a tiny MVSA root, with paths relative to the manifest."""
    rows, _ = read_mvsa(write_mvsa(root / "mvsa", n=40))
    path = root / "train.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "text", "label"])
        writer.writerows([row.image.relative_to(root).as_posix(), row.text, row.label] for row in rows)
    return path


def shrink(name: str, tmp_path: Path) -> Path:
    """The recipe with a tiny CNN, short texts, tiny data, 2 epochs (1 of probe) and logs under tmp_path."""
    config = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())
    image = config["model"]["init_args"]["encoders"]["image"]["init_args"]
    image.update(model_name="test_resnet", checkpoint_path=None, pretrained=False)
    image.pop("checkpoint_prefix", None)
    if "text" in config["model"]["init_args"]["encoders"]:
        config["model"]["init_args"]["encoders"]["text"]["init_args"]["max_seq_length"] = 24
    data = config["data"]["init_args"]
    data.update(image_size=32, batch_size=8, max_length=24)
    if "image_model" in data:
        data["image_model"] = "test_resnet"
    if name in ("quickstart", "pretrain_image"):
        data.update(train_size=32, val_size=16, test_size=16)
    elif name.startswith("mvsa"):
        data.update(root=str(write_mvsa(tmp_path / "mvsa", n=40, variant=name.removeprefix("mvsa_"))), num_workers=0)
    else:
        data.update(train=str(write_manifest(tmp_path)), num_workers=0)
    trainer = config["trainer"]
    trainer.update(max_epochs=2, accelerator="cpu", log_every_n_steps=1, enable_model_summary=False)
    for logger in trainer["logger"]:
        logger["init_args"]["save_dir"] = str(tmp_path / "runs")
    trainer["callbacks"] = [c for c in trainer["callbacks"] if not c["class_path"].endswith("RichProgressBar")]
    callbacks = callbacks_of(config)
    if "LinearProbeFinetune" in callbacks:
        callbacks["LinearProbeFinetune"].update(probe_epochs=1, warmup_steps=2)
    for checkpoint in checkpoints_of(config):
        if checkpoint.get("dirpath"):
            checkpoint["dirpath"] = str(tmp_path / "checkpoints")
    path = tmp_path / f"{name}-tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.ddp
def test_the_image_pretraining_recipe_trains_with_two_process_ddp(tmp_path, run_cli_subprocess):
    config = shrink("pretrain_image", tmp_path)
    # One process started, as a user does: Lightning's launcher starts the second (tests/test_cli.py too).
    result = run_cli_subprocess(
        "fit", "-c", str(config), "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu",
    )
    saved = torch.load(tmp_path / "checkpoints" / "image-encoder.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == 2 * (saved["epoch"] + 1)  # 32 samples, batch 8, 2 processes: 2 steps an epoch
    assert all(key.startswith(("encoders.image.", "fusion.", "metrics.", "train_losses.")) for key in saved["state_dict"])
    assert "test/acc" in result.stdout


# The quick start's: tests/test_cli.py. MVSA-Multiple's recipe is MVSA-Single's data module and model on another label
# file (trained in one process in tests above): under DDP it adds nothing but a minute of CI.
@pytest.mark.parametrize("name", ["mvsa_single", "manifest"])
def test_recipe_trains_with_two_process_ddp(name, tmp_path, run_ddp_cli):
    config = shrink(name, tmp_path)
    result, _ = run_ddp_cli(  # both processes started together; rank 0 prints the summary and the stages
        "fit", "-c", str(config), "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu",
        timeout=600,
    )
    assert "best checkpoint" in result.stdout and "test/f1" in result.stdout
    run = tmp_path / "runs" / name / "version_0"
    assert "StagedFinetuning: stage 1 'finetune' from epoch 1" in result.stderr
    assert (run / "gradcheck-epoch0.json").is_file() and json.loads((run / "gradcheck-epoch0.json").read_text())["passed"]
    assert json.loads((run / "labels.json").read_text()) == ["negative", "neutral", "positive"]
    if name.startswith("mvsa"):
        cleaning = json.loads((run / "mvsa_cleaning.json").read_text())
        assert cleaning["dropped"]["conflict"] == 4
    best = next((run / "checkpoints").glob("best-*.ckpt"))
    checkpoint = torch.load(best, map_location="cpu", weights_only=False)
    assert checkpoint["hyper_parameters"]["num_classes"] == 3
    report = (run / "report.md").read_text()
    assert "| fused |" in report and "test macro-F1" in report and "| 1 | finetune | 1 |" in report
    for plot in ("loss.png", "metrics.png", "lr.png", "balancing.png"):
        assert (run / plot).is_file(), plot


def test_a_recipe_trains_in_bf16_mixed_precision(tmp_path, monkeypatch):
    """Mixed precision through the recipe (bf16 autocast runs on CPU; 16-mixed needs a GPU): the gradient check, the
    stages, OGM-GE and the report work under autocast."""
    from ml_optim_plugins import ModalityBalancer
    from ml_optim_plugins.cli import run

    monkeypatch.chdir(tmp_path)
    config = shrink("mvsa_single", tmp_path)
    cli = run(["fit", "-c", str(config), "--trainer.precision", "bf16-mixed"])
    assert cli.trainer.precision == "bf16-mixed" and cli.trainer.global_step == 8
    balancer = next(c for c in cli.trainer.callbacks if isinstance(c, ModalityBalancer))
    assert balancer.last and all(0.0 < stats["coefficient"] <= 1.0 for stats in balancer.last.values())
    report = (Path(cli.trainer.log_dir) / "report.md").read_text()
    assert "| 1 | finetune | 1 | 4 |" in report and "test macro-F1" in report


def test_the_small_variant_runs_every_stage_of_the_quick_start(tmp_path, monkeypatch):
    """recipes/quickstart.yaml + recipes/variants/small.yaml as documented: no pretraining checkpoint, both stages
    start, the finetuning warmup completes, both gradient checks run, OGM-GE acts, then the test and the report. For
    the test's time only, the CNN, the images, the texts and the batches are smaller (80 samples in batches of 4: the
    variant's 20 optimizer steps an epoch, on a quarter of its samples) and evaluation stops after 2 batches."""
    from ml_optim_plugins import LinearProbeFinetune, ModalityBalancer
    from ml_optim_plugins.cli import run

    variant = yaml.safe_load((RECIPES / "variants" / "small.yaml").read_text())["data"]["init_args"]
    assert variant["train_size"] / variant["batch_size"] == 20 == 80 / 4
    monkeypatch.chdir(tmp_path)
    cli = run([
        "fit", "-c", str(RECIPES / "quickstart.yaml"), "-c", str(RECIPES / "variants" / "small.yaml"),
        "--model.init_args.encoders.image.init_args.model_name", "test_resnet", "--data.init_args.image_size", "32",
        "--model.init_args.encoders.text.init_args.max_seq_length", "16", "--data.init_args.max_length", "16",
        "--data.init_args.train_size", "80", "--data.init_args.batch_size", "4", "--trainer.limit_val_batches", "2",
        "--trainer.limit_test_batches", "2", "--trainer.enable_model_summary", "false",
    ])
    trainer = cli.trainer
    assert sorted(cli.model.encoders) == ["image", "text"] and not cli.model.encoders["image"].pretrained_weights
    assert trainer.global_step == 80  # 20 steps, 4 epochs
    staged = next(c for c in trainer.callbacks if isinstance(c, LinearProbeFinetune))
    assert [(b["name"], b["epoch"], b["step"]) for b in staged.boundaries] == [("probe", 0, 0), ("finetune", 2, 40)]
    run_dir = Path(trainer.log_dir).resolve()
    assert run_dir == tmp_path.resolve() / "runs" / "quickstart-small" / "version_0"
    # The image encoder trains at the recipe's fraction of the head's LR once its 20-step warmup (steps 40-59) is over
    # (rows every 10 steps: 9, 19, ...).
    shipped = yaml.safe_load((RECIPES / "quickstart.yaml").read_text())
    multiplier = callbacks_of(shipped)["LinearProbeFinetune"]["lr_multipliers"]["image"]
    rows = {int(row["step"]): row for row in csv.DictReader((run_dir / "metrics.csv").open())
            if row.get("lr-AdamW/encoders.image")}
    ratio = {step: float(row["lr-AdamW/encoders.image"]) / float(row["lr-AdamW/fusion"]) for step, row in rows.items()}
    assert ratio[29] == 0.0 and 0.0 < ratio[49] < multiplier and ratio[69] == pytest.approx(multiplier)
    assert [json.loads((run_dir / f"gradcheck-epoch{e}.json").read_text())["passed"] for e in (0, 2)] == [True, True]
    balancer = next(c for c in trainer.callbacks if isinstance(c, ModalityBalancer))
    assert balancer.last and min(stats["coefficient"] for stats in balancer.last.values()) < 1.0
    report = (run_dir / "report.md").read_text()
    assert "| 1 | finetune | 2 | 40 |" in report and "test macro-F1" in report
