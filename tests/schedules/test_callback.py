"""WarmupDecay in a real Trainer: step counting, derived totals, multipliers, late groups, several optimizers,
LearningRateMonitor keys, resume parity and errors before the first step."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from ml_optim_plugins import WarmupDecay
from ml_optim_plugins.schedules import WarmupDecaySchedule
from tests.schedules.tiny_modules import AddGroupAt, LRRecorder, TwoLayer, TwoOptimizers


@pytest.mark.parametrize("accumulate, batches, epochs", [(1, 10, 2), (3, 10, 2), (4, 7, 3)])
def test_counts_optimizer_steps_and_derives_the_total(make_trainer, accumulate, batches, epochs):
    callback = WarmupDecay(warmup_ratio=0.2, decay="cosine", min_lr_ratio=0.05)
    recorder = LRRecorder()
    trainer = make_trainer(
        accumulate_grad_batches=accumulate, limit_train_batches=batches, max_epochs=epochs, callbacks=[callback, recorder]
    )
    trainer.fit(TwoLayer())
    total = math.ceil(batches / accumulate) * epochs
    assert callback.resolved.total_steps == total == trainer.global_step
    assert callback.resolved.warmup_steps == math.ceil(0.2 * total)
    expected = [callback.resolved.lr(k, 0.1) for k in range(total)]
    assert [lrs[0] for lrs in recorder.lrs[0]] == pytest.approx(expected)
    assert expected[0] == 0.0 and max(expected) == pytest.approx(0.1)


def test_max_steps_bounds_the_total(make_trainer):
    callback = WarmupDecay(warmup_steps=2, decay="linear")
    make_trainer(max_steps=7, max_epochs=5, callbacks=[callback]).fit(TwoLayer())
    assert callback.resolved.total_steps == 7


def test_each_group_keeps_its_own_base_lr(make_trainer):
    recorder = LRRecorder()
    callback = WarmupDecay(warmup_steps=3, decay="linear", min_lr_ratio=0.1)
    make_trainer(callbacks=[callback, recorder]).fit(TwoLayer(per_layer_groups=True))
    schedule = callback.resolved
    body, head = zip(*recorder.lrs[0])
    assert body == pytest.approx([schedule.lr(k, 0.1) for k in range(20)])
    assert head == pytest.approx([schedule.lr(k, 0.05) for k in range(20)])


def test_multipliers_split_a_shared_group_and_name_the_parts(make_trainer, tmp_path):
    recorder = LRRecorder()
    callback = WarmupDecay(warmup_steps=2, decay="constant", lr_multipliers={"body": 0.1, "head.b*": 2.0})
    trainer = make_trainer(
        callbacks=[callback, recorder, LearningRateMonitor(logging_interval="step")],
        logger=CSVLogger(tmp_path), log_every_n_steps=1,
    )
    model = TwoLayer()
    trainer.fit(model)
    groups = trainer.optimizers[0].param_groups
    assert [g["name"] for g in groups] == ["body", "head", "head.b*"]
    assert [len(g["params"]) for g in groups] == [2, 1, 1]
    assert groups[1]["params"][0] is model.head.weight and groups[2]["params"][0] is model.head.bias
    assert recorder.lrs[0][5] == pytest.approx([0.01, 0.1, 0.2])
    header = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"lr-SGD/body", "lr-SGD/head", "lr-SGD/head.b*"} <= set(header)


def test_unnamed_groups_are_named_after_their_module(make_trainer):
    callback = WarmupDecay(warmup_steps=1, decay="constant")
    trainer = make_trainer(max_steps=2, callbacks=[callback, AddGroupAt(1)])
    trainer.fit(TwoLayer(per_layer_groups=True))
    assert [g["name"] for g in trainer.optimizers[0].param_groups] == ["body", "head", "late"]


def test_group_added_mid_run_warms_up_from_its_first_step(make_trainer):
    recorder = LRRecorder()
    callback = WarmupDecay(warmup_steps=4, decay="linear", late_warmup_steps=5)
    make_trainer(callbacks=[AddGroupAt(8, lr=0.05), callback, recorder]).fit(TwoLayer())
    schedule = callback.resolved
    late = [lrs[1] for lrs in recorder.lrs[0][8:]]
    assert late == pytest.approx([schedule.group_lr(k, 0.05, 8, 5) for k in range(8, 20)])
    assert late[0] == 0.0 and late[5] == pytest.approx(schedule.lr(13, 0.05))
    assert [lrs[0] for lrs in recorder.lrs[0]] == pytest.approx([schedule.lr(k, 0.1) for k in range(20)])


def test_restart_warmup_of_a_gated_group(make_trainer):
    class Unfreeze(AddGroupAt):
        def on_train_batch_start(self, trainer, pl_module, *args):
            if trainer.global_step == self.step:
                callback.restart_warmup(0, 1, warmup_steps=4)

    recorder = LRRecorder()
    callback = WarmupDecay(warmup_steps=2, decay="constant")
    make_trainer(callbacks=[callback, Unfreeze(6), recorder]).fit(TwoLayer(per_layer_groups=True))
    head = [lrs[1] for lrs in recorder.lrs[0]]
    assert head[4:12] == pytest.approx([0.05, 0.05, 0.0, 0.0125, 0.025, 0.0375, 0.05, 0.05])


def test_several_optimizers_each_follow_their_own_step_count(make_trainer):
    recorder = LRRecorder()
    callback = WarmupDecay(warmup_steps=3, total_steps=40, decay="cosine")
    make_trainer(max_epochs=1, limit_train_batches=12, callbacks=[callback, recorder]).fit(TwoOptimizers())
    schedule = callback.resolved
    sgd, adam = [[lrs[0] for lrs in recorder.lrs[i]] for i in (0, 1)]
    assert len(sgd) == 8 and len(adam) == 6  # steps on 0,2,3,4,6,8,9,10 and on odd batches
    assert sgd == pytest.approx([schedule.lr(k, 0.1) for k in range(8)])
    assert adam == pytest.approx([schedule.lr(k, 0.01) for k in range(6)])


def test_optimizers_argument_leaves_the_others_alone(make_trainer):
    recorder = LRRecorder()
    make_trainer(max_epochs=1, limit_train_batches=12, callbacks=[WarmupDecay(warmup_steps=3, total_steps=40, optimizers=[1]), recorder]).fit(TwoOptimizers())
    assert {lrs[0] for lrs in recorder.lrs[0]} == {0.1}
    assert recorder.lrs[1][0] == [0.0]


def _fit_recording(make_trainer, checkpoint: str | None = None, **trainer_args):
    recorder = LRRecorder()
    callbacks = [AddGroupAt(6, lr=0.05), WarmupDecay(warmup_steps=4, decay="cosine", min_lr_ratio=0.1), recorder]
    extra = trainer_args.pop("extra", [])
    trainer = make_trainer(
        accumulate_grad_batches=2, max_epochs=3, callbacks=callbacks + extra, enable_checkpointing=bool(extra)
    )
    torch.manual_seed(0)
    trainer.fit(TwoLayer(), ckpt_path=checkpoint)
    return recorder.lrs[0]


def test_resume_from_any_step_follows_the_uninterrupted_trajectory(make_trainer, tmp_path):
    """One run saves a checkpoint at every optimizer step; resuming from several (mid-warmup, just before and after
    the late group joined, mid-epoch, epoch boundary, last step) gives exactly the rest of that run's LRs."""
    every_step = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1)
    full = _fit_recording(make_trainer, extra=[every_step])
    assert len(full) == 15 and len(full[-1]) == 2
    for stop in (2, 5, 6, 7, 10, 14):
        (path,) = (tmp_path / "ckpt").glob(f"*-step={stop}.ckpt")
        resumed = _fit_recording(make_trainer, checkpoint=str(path))
        assert resumed == full[stop:], f"resumed from step {stop}"


def test_state_dict_round_trip_is_plain_data(make_trainer):
    callback = WarmupDecay(warmup_steps=2, decay="linear")
    make_trainer(max_steps=5, callbacks=[callback]).fit(TwoLayer())
    state = callback.state_dict()
    assert state["steps"] == {"0": 5} and state["total_steps"] == 5
    assert state["groups"]["0"] == [{"name": "pg1", "base_lr": 0.1, "first_step": 0, "warmup_steps": 0}]
    other = WarmupDecay(warmup_steps=2, decay="linear")
    other.load_state_dict(state)
    assert other.state_dict()["steps"] == state["steps"] and other.state_dict()["groups"] == state["groups"]


class _FailIfTrained(LRRecorder):
    pass


@pytest.mark.parametrize(
    "callback, model, error, message",
    [
        (WarmupDecay(warmup_steps=500), TwoLayer(), ValueError, r"warmup_steps \(500\) exceeds the total training steps \(20\)"),
        (WarmupDecay(min_lr=0.5), TwoLayer(), ValueError, r"min_lr \(0.5\) is above the base learning rate of param group 'pg1' \(0.1\)"),
        (WarmupDecay(lr_multipliers={"encoder": 0.1}), TwoLayer(), ValueError, r"key 'encoder' matches no parameter.*\['body', 'head', 'late'\]"),
        (WarmupDecay(optimizers=[2]), TwoLayer(), MisconfigurationException, r"\[2\] out of range"),
        (WarmupDecay(warmup_steps=2), TwoLayer(scheduler_args={"total_steps": 20}), MisconfigurationException,
         "also attaches WarmupDecayLR to it"),
        (WarmupDecay(decay="linear"), TwoLayer(), ValueError, "needs the total number of optimizer steps"),
    ],
    ids=["warmup-too-long", "min-lr-above-base", "unknown-module", "bad-optimizer-index", "scheduler-attached", "no-total"],
)
def test_bad_setup_fails_before_the_first_step(make_trainer, callback, model, error, message):
    recorder = _FailIfTrained()
    max_epochs = -1 if message.startswith("needs the total") else 2
    trainer = make_trainer(callbacks=[callback, recorder], max_epochs=max_epochs)
    with pytest.raises(error, match=message):
        trainer.fit(model)
    assert recorder.lrs == {} and trainer.global_step == 0


@pytest.mark.parametrize("optimizers", [None, [0, 1]])
def test_state_key_has_the_format_of_lightnings_callbacks(optimizers):
    """The key under which checkpoints hold the callback's state: written out with the format of Lightning's private
    ``Callback._generate_state_key`` (Lightning 2.6.6), so checkpoints saved through it still load."""
    from lightning.pytorch.callbacks import Callback

    callback = WarmupDecay(optimizers=optimizers)
    assert callback.state_key == Callback._generate_state_key(callback, optimizers=callback.optimizer_indices)
    assert callback.state_key == f"WarmupDecay{{'optimizers': {optimizers}}}"


def test_schedule_object_or_keywords_not_both():
    with pytest.raises(TypeError, match="not both"):
        WarmupDecay(WarmupDecaySchedule(), warmup_steps=3)
    with pytest.raises(ValueError, match="late_warmup_steps must be an integer >= 0"):
        WarmupDecay(late_warmup_steps=-1)


def test_wrapper_modules_do_not_change_the_names_multipliers_match():
    from ml_optim_plugins.schedules.param_groups import parameter_names

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self._fsdp_wrapped_module = torch.nn.ModuleDict({"encoder": torch.nn.Linear(2, 2)})

    assert sorted(parameter_names(Wrapped()).values()) == ["encoder.bias", "encoder.weight"]


def test_several_manual_optimizers_need_an_explicit_total(make_trainer):
    trainer = make_trainer(max_steps=20, callbacks=[WarmupDecay(warmup_steps=2)])
    with pytest.raises(MisconfigurationException, match="pass total_steps, the number of steps of each optimizer"):
        trainer.fit(TwoOptimizers())


def test_modules_built_in_configure_model_are_seen(make_trainer):
    class Late(TwoLayer):
        def __init__(self):
            super().__init__()
            del self.body

        def configure_model(self):
            if not hasattr(self, "body"):
                self.body = torch.nn.Linear(32, 16)

    recorder = LRRecorder()
    make_trainer(max_steps=3, callbacks=[WarmupDecay(decay="constant", lr_multipliers={"body": 0.5}), recorder]).fit(Late())
    assert recorder.lrs[0][-1] == [0.05, 0.1]


def test_restart_warmup_revives_a_group_gated_at_lr_zero(make_trainer):
    class Ungate(AddGroupAt):
        def on_train_batch_start(self, trainer, pl_module, *args):
            if trainer.global_step == self.step:
                trainer.optimizers[0].param_groups[1]["lr"] = 0.05
                callback.restart_warmup(0, 1, warmup_steps=2)

    class Gated(TwoLayer):
        def configure_optimizers(self):
            return torch.optim.SGD([{"params": self.body.parameters()}, {"params": self.head.parameters(), "lr": 0.0}], lr=0.1)

    recorder = LRRecorder()
    callback = WarmupDecay(decay="constant")
    make_trainer(max_steps=8, callbacks=[callback, Ungate(4), recorder]).fit(Gated())
    assert [lrs[1] for lrs in recorder.lrs[0]] == pytest.approx([0, 0, 0, 0, 0.0, 0.025, 0.05, 0.05])


def test_lbfgs_closure_evaluations_count_as_one_step(make_trainer):
    class WithLBFGS(TwoLayer):
        def configure_optimizers(self):
            return torch.optim.LBFGS(self.parameters(), lr=0.1, max_iter=4)

    callback = WarmupDecay(warmup_steps=2, decay="linear")
    trainer = make_trainer(max_steps=4, callbacks=[callback])
    trainer.fit(WithLBFGS())
    assert callback.state_dict()["steps"] == {"0": trainer.global_step} == {"0": 4}


def test_fast_dev_run_leaves_the_optimizer_alone(make_trainer):
    recorder = LRRecorder()
    make_trainer(fast_dev_run=True, callbacks=[WarmupDecay(warmup_steps=100), recorder]).fit(TwoLayer())
    assert recorder.lrs[0] == [[0.1]]
