"""A run stopped in the middle of a stage and resumed from its checkpoint continues in the same stage with the same
groups, LRs, plateau counters and cache validity, and ends with the same weights as a run that never stopped."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from ml_optim_plugins import Stage, StagedFinetuning, WarmupDecay
from tests.finetuning.test_callback import LogMetric, Recorder
from tests.finetuning.tiny import loader, tiny_staged_model, trainer

PLANS = {
    "epochs": lambda: [Stage(name="probe"), Stage(start_epoch=1, trainable=["image", "text[-1]"], warmup_steps=4,
                                                   lr_multipliers={"text": 0.5}),
                       Stage(start_epoch=3, trainable=["image", "text"], lr_multipliers={"text[:2]": 0.1})],
    "steps": lambda: [Stage(name="probe"), Stage(start_step=9, trainable=["text[-2:]"], warmup_steps=3),
                      Stage(start_step=20, trainable=["image", "text"])],
    "plateau": lambda: [Stage(name="probe"), Stage(monitor="val/score", mode="max", patience=1, trainable=["image"]),
                        Stage(monitor="val/score", mode="max", patience=1, trainable=["image", "text"])],
}


def _model():
    model = tiny_staged_model()
    for module in model.modules():  # checkpoints do not carry the RNG: no dropout noise, so the runs can be compared
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


@pytest.mark.parametrize("plan", sorted(PLANS))
def test_resume_in_the_middle_of_a_stage_is_exact(plan, tmp_path):
    def run(epochs, checkpoint=None, save=False):
        staged, recorder = StagedFinetuning(PLANS[plan](), cache_features=True), Recorder()
        callbacks = [staged, WarmupDecay(warmup_steps=2, decay="cosine"), recorder, LogMetric([0, 0, 1, 1, 1])]
        if save:
            callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, save_on_train_epoch_end=True))
        model = _model()
        trainer(tmp_path, max_epochs=epochs, callbacks=callbacks, enable_checkpointing=save).fit(
            model, loader(), loader(n=16), ckpt_path=checkpoint)
        return model, staged, recorder

    straight, straight_plan, straight_rows = run(5, save=True)
    # The checkpoint of epoch 1 (0-based) ends in the middle of stage 1 (or, for the plateau plan, with stage 1
    # pending: the plateau was detected at that epoch's validation).
    resumed, resumed_plan, resumed_rows = run(5, checkpoint=tmp_path / "ckpt" / "epoch=1-step=12.ckpt")
    assert resumed_plan.stage_index == straight_plan.stage_index == 2
    assert resumed_plan.boundaries == straight_plan.boundaries
    assert len(straight_plan.boundaries) == 3
    assert resumed_plan.cache.active == straight_plan.cache.active == []
    def lrs(rows):
        return [(name, lr) for row in rows for name, lr in row["lrs"].items()]

    assert [n for n, _ in lrs(resumed_rows.rows)] == [n for n, _ in lrs(straight_rows.rows[12:])]
    assert [lr for _, lr in lrs(resumed_rows.rows)] == pytest.approx([lr for _, lr in lrs(straight_rows.rows[12:])])
    assert [r["grads"] for r in resumed_rows.rows] == [r["grads"] for r in straight_rows.rows[12:]]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


@pytest.mark.parametrize(("plan", "resume_step", "boundaries"), [
    # At epoch 0's last step, before an epoch-triggered unfreeze: Lightning skips epoch 1's start hooks.
    ("epochs", 6, [(0, 0, 0), (1, 1, 6)]),
    # Mid-epoch, after a step-triggered stage, before one due at the next epoch's start: never early.
    ("step, then epoch", 9, [(0, 0, 0), (1, 1, 8), (2, 2, 12)]),
])
def test_resumed_at_a_step_each_stage_starts_on_time(plan, resume_step, boundaries, tmp_path):
    """A checkpoint saved at an epoch's last step (every_n_train_steps dividing the epoch) resumes into the next epoch
    without Lightning calling its on_train_epoch_start hooks; the stage that starts with that epoch still does, at its
    first step, and a mid-epoch resume never starts an epoch's stage early; boundaries, LRs and weights equal a run never
    stopped."""
    # Stage 2 is due from epoch 1, but stage 1 only starts inside it: stage 2 waits for epoch 2's start.
    plans = {**PLANS, "step, then epoch": lambda: [Stage(name="probe"), Stage(start_step=8, trainable=["text[-1]"]),
                                                   Stage(start_epoch=1, trainable=["image", "text"])]}

    def run(checkpoint=None):
        staged, recorder = StagedFinetuning(plans[plan]()), Recorder()
        callbacks = [staged, WarmupDecay(warmup_steps=2, decay="cosine"), recorder]
        if checkpoint is None:
            callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_train_steps=resume_step,
                                             filename="{step}"))
        model = _model()
        trainer(tmp_path, max_epochs=3, callbacks=callbacks, enable_checkpointing=checkpoint is None).fit(
            model, loader(), loader(n=16), ckpt_path=checkpoint)
        return model, staged, recorder

    straight, straight_plan, straight_rows = run()
    checkpoint = tmp_path / "ckpt" / f"step={resume_step}.ckpt"
    resumed, resumed_plan, resumed_rows = run(checkpoint)
    assert resumed_plan.boundaries == straight_plan.boundaries
    assert [(b["stage"], b["epoch"], b["step"]) for b in straight_plan.boundaries] == boundaries
    assert [r["grads"] for r in resumed_rows.rows] == [r["grads"] for r in straight_rows.rows[resume_step:]]
    resumed_lrs, straight_lrs = ([(n, lr) for row in rows for n, lr in sorted(row["lrs"].items())]
                                 for rows in (resumed_rows.rows, straight_rows.rows[resume_step:]))
    assert [n for n, _ in resumed_lrs] == [n for n, _ in straight_lrs]
    assert [lr for _, lr in resumed_lrs] == pytest.approx([lr for _, lr in straight_lrs])
    if resume_step % 6 == 0:  # the tiny loader is a plain DataLoader: inside an epoch it cannot resume its place
        for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
            assert torch.allclose(a, b, atol=1e-6), name


def test_a_staged_finetuning_reused_for_a_second_fit_starts_from_its_first_stage(tmp_path):
    staged = StagedFinetuning(PLANS["epochs"]())
    for _ in range(2):
        recorder = Recorder()
        trainer(tmp_path, max_epochs=2, callbacks=[staged, WarmupDecay(warmup_steps=2), recorder]).fit(
            _model(), loader(), loader(n=16))
        assert [(b["stage"], b["epoch"], b["step"]) for b in staged.boundaries] == [(0, 0, 0), (1, 1, 6)]
        assert not any(name.startswith("encoders.") for name in recorder.rows[0]["grads"])  # the probe, frozen
