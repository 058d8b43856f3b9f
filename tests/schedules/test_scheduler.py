"""warmup_decay_scheduler: the curve per optimizer step under Lightning, late groups, and its state_dict."""

from __future__ import annotations

import pytest
import torch

from ml_optim_plugins import warmup_decay_scheduler
from ml_optim_plugins.schedules import WarmupDecaySchedule
from ml_optim_plugins.schedules import WarmupDecayLR
from tests.schedules.tiny_modules import AddGroupAt, LRRecorder, TwoLayer


@pytest.mark.parametrize("accumulate", [1, 3])
def test_lightning_steps_it_once_per_optimizer_step(make_trainer, accumulate):
    args = dict(warmup_steps=3, total_steps=20, decay="cosine", min_lr_ratio=0.1)
    recorder = LRRecorder()
    trainer = make_trainer(accumulate_grad_batches=accumulate, max_steps=20, max_epochs=-1, callbacks=[recorder])
    trainer.fit(TwoLayer(scheduler_args=args))
    schedule = WarmupDecaySchedule(**args)
    assert trainer.global_step == 20
    assert [lrs[0] for lrs in recorder.lrs[0]] == pytest.approx([schedule.lr(k, 0.1) for k in range(20)])


def test_group_added_later_gets_its_own_warmup_from_the_next_scheduler_step(make_trainer):
    """The scheduler only sees the optimizer when Lightning steps it, after the optimizer step: the new group's first
    step runs at the LR it was added with, then it warms up (the WarmupDecay callback catches it before its first)."""
    args = dict(warmup_steps=4, total_steps=30, decay="linear")
    recorder = LRRecorder()
    trainer = make_trainer(max_steps=30, max_epochs=-1, callbacks=[AddGroupAt(10, lr=0.05), recorder])
    trainer.fit(TwoLayer(scheduler_args=args))
    schedule = WarmupDecaySchedule(**args)
    late = [lrs[1] for lrs in recorder.lrs[0][10:]]
    assert late[0] == 0.05
    assert late[1:] == pytest.approx([schedule.group_lr(k, 0.05, first_step=11) for k in range(11, 30)])
    assert late[1] == 0.0 and late[5] == pytest.approx(schedule.lr(15, 0.05))
    assert [lrs[0] for lrs in recorder.lrs[0]] == pytest.approx([schedule.lr(k, 0.1) for k in range(30)])


def test_each_group_follows_its_own_base_lr():
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
    optimizer = torch.optim.AdamW([{"params": [params[0]], "lr": 1e-3}, {"params": [params[1]], "lr": 1e-4}])
    scheduler = warmup_decay_scheduler(optimizer, warmup_steps=2, total_steps=10, decay="linear")
    for _ in range(6):
        optimizer.step()
        scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-3 * 0.5, 1e-4 * 0.5])


def test_state_dict_is_plain_data_and_resumes_the_curve():
    def fresh():
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        return opt, warmup_decay_scheduler(opt, warmup_steps=3, total_steps=12, decay="cosine")

    opt, scheduler = fresh()
    for _ in range(5):
        opt.step()
        scheduler.step()
    state = scheduler.state_dict()
    assert "schedule" not in state and state["last_epoch"] == 5
    opt2, scheduler2 = fresh()
    opt2.load_state_dict(opt.state_dict())
    scheduler2.load_state_dict(state)
    for _ in range(4):
        opt.step(), scheduler.step(), opt2.step(), scheduler2.step()
        assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_bad_calls_fail_before_training():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    with pytest.raises(ValueError, match="needs the total number of optimizer steps"):
        warmup_decay_scheduler(opt, warmup_steps=10, decay="cosine")
    with pytest.raises(ValueError, match=r"min_lr \(0.001\) is above the base learning rate of param group #0"):
        warmup_decay_scheduler(opt, total_steps=10, min_lr=1e-3)
    with pytest.raises(TypeError, match="not both"):
        warmup_decay_scheduler(opt, WarmupDecaySchedule(total_steps=5), warmup_steps=2)
    assert isinstance(warmup_decay_scheduler(opt, total_steps=10.0), WarmupDecayLR)
