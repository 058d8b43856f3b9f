"""StagedFinetuning's override hooks in a real Trainer (managed_modules, should_start_stage, on_stage_start), and the
seams it relies on: whether a fit has validation data (lightning_internals) and its place before the LR driver."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest

from ml_optim_plugins import Stage, StagedFinetuning, WarmupDecay
from ml_optim_plugins.lightning_internals import val_dataloader_defined
from tests.finetuning.test_callback import Recorder
from tests.finetuning.tiny import loader, tiny_staged_model, trainer


class StartAtStep(StagedFinetuning):
    """Starts each later stage at optimizer step ``3 * index`` (its own triggers never fire in these runs), and
    records the stages it enters."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.started = []

    def should_start_stage(self, trainer, index, *, at_epoch_start):
        return trainer.global_step >= 3 * index

    def on_stage_start(self, trainer, pl_module, index):
        self.started.append((index, trainer.global_step, pl_module.encoders["image"].stem[0].weight.requires_grad))


@pytest.mark.filterwarnings("ignore:StagedFinetuning. stage 1 .stage1. starts at epoch 100")
def test_a_custom_trigger_starts_the_stage_and_on_stage_start_sees_it_applied():
    plan = StartAtStep([Stage(), Stage(start_epoch=100, trainable=["image"])])
    recorder = Recorder()
    trainer(max_steps=5, callbacks=[plan, recorder]).fit(tiny_staged_model(), loader())
    assert plan.started == [(0, 0, False), (1, 3, True)]
    assert [(b["stage"], b["step"]) for b in plan.boundaries] == [(0, 0), (1, 3)]
    assert ["encoders.image.stem.0.weight" in row["grads"] for row in recorder.rows] == [False] * 3 + [True] * 2


class TextOnly(StagedFinetuning):
    def managed_modules(self, pl_module, modalities):
        return ["text"]


def test_managed_modules_decides_what_is_staged():
    plan, recorder = TextOnly([Stage()]), Recorder()
    trainer(max_steps=1, callbacks=[plan, recorder]).fit(tiny_staged_model(), loader())
    grads = recorder.rows[0]["grads"]
    assert "encoders.image.stem.0.weight" in grads and not any(n.startswith("encoders.text") for n in grads)


class ValidationSeen(pl.Callback):
    def on_fit_start(self, trainer, pl_module):
        self.defined = val_dataloader_defined(trainer)


class WithValidation(pl.LightningDataModule):
    def train_dataloader(self):
        return loader()

    def val_dataloader(self):
        return loader(n=16)


class WithoutValidation(pl.LightningDataModule):
    def train_dataloader(self):
        return loader()


@pytest.mark.parametrize(
    ("data", "defined"),
    [
        (lambda: {"train_dataloaders": loader()}, False),
        (lambda: {"train_dataloaders": loader(), "val_dataloaders": loader(n=16)}, True),
        (lambda: {"datamodule": WithValidation()}, True),
        (lambda: {"datamodule": WithoutValidation()}, False),
    ],
)
def test_whether_a_fit_has_validation_data_is_known_at_fit_start(data, defined):
    """Covers lightning_internals.val_dataloader_defined: if Lightning renames the loop's data source, the cases
    without validation data fail here (the function then assumes validation runs)."""
    seen = ValidationSeen()
    trainer(max_steps=1, limit_val_batches=1, callbacks=[seen]).fit(tiny_staged_model(), **data())
    assert seen.defined is defined


def test_it_moves_itself_before_the_lr_driver_and_only_then():
    warmup, staged = WarmupDecay(warmup_steps=1), StagedFinetuning([Stage()])
    run = trainer(max_steps=1, callbacks=[warmup, staged])
    run.fit(tiny_staged_model(), loader())
    assert run.callbacks.index(staged) < run.callbacks.index(warmup)
    staged = StagedFinetuning([Stage()])
    run = trainer(max_steps=1, callbacks=[staged, WarmupDecay(warmup_steps=1)])
    before = list(run.callbacks)
    run.fit(tiny_staged_model(), loader())
    assert run.callbacks == before
