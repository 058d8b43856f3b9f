"""Same arguments, same curve: our shapes against transformers' get_scheduler, timm's CosineLRScheduler and torch's
schedulers, within 1e-6, on every step of the run."""

from __future__ import annotations

import pytest
import torch
from timm.scheduler import CosineLRScheduler
from transformers import get_scheduler

from ml_optim_plugins.schedules import WarmupDecaySchedule

BASE = 3e-4
TOL = 1e-6 * BASE  # 1e-6 relative to the peak LR


def optimizer(lr: float = BASE) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def torch_curve(scheduler: torch.optim.lr_scheduler.LRScheduler, steps: int) -> list[float]:
    lrs = []
    for _ in range(steps):
        lrs.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return lrs


def our_curve(schedule: WarmupDecaySchedule, steps: int) -> list[float]:
    return [schedule.lr(step, BASE) for step in range(steps)]


T, W = 240, 24

# transformers name, its scheduler_specific_kwargs, our equivalent arguments
TRANSFORMERS_CASES = [
    ("linear", {}, {"decay": "linear"}),
    ("cosine", {}, {"decay": "cosine"}),
    ("cosine_with_restarts", {"num_cycles": 3}, {"decay": "cosine", "cycles": 3}),
    ("polynomial", {"power": 2.0, "lr_end": 1e-6}, {"decay": "polynomial", "power": 2.0, "min_lr": 1e-6}),
    ("polynomial", {}, {"decay": "polynomial", "min_lr": 1e-7}),
    ("constant_with_warmup", {}, {"decay": "constant"}),
    ("inverse_sqrt", {}, {"decay": "inverse_sqrt"}),
    ("inverse_sqrt", {"timescale": 50}, {"decay": "inverse_sqrt", "timescale": 50}),
    ("cosine_with_min_lr", {"min_lr": 3e-5}, {"decay": "cosine", "min_lr": 3e-5}),
    ("cosine_with_min_lr", {"min_lr_rate": 0.05}, {"decay": "cosine", "min_lr_ratio": 0.05}),
    (
        "warmup_stable_decay",
        {"num_decay_steps": 60, "min_lr_ratio": 0.1, "decay_type": "cosine"},
        {"decay": "wsd", "cooldown_steps": 60, "cooldown": "cosine", "min_lr_ratio": 0.1, "warmup_start_factor": 0.1},
    ),
    (
        "warmup_stable_decay",
        {"num_decay_steps": 48, "decay_type": "1-sqrt", "warmup_type": "cosine"},
        {"decay": "wsd", "cooldown_steps": 48, "cooldown": "1-sqrt", "warmup": "cosine"},
    ),
    (
        "warmup_stable_decay",
        {"num_decay_steps": 100, "decay_type": "linear"},
        {"decay": "wsd", "cooldown_steps": 100, "cooldown": "linear"},
    ),
]


@pytest.mark.parametrize("name, theirs, ours", TRANSFORMERS_CASES, ids=lambda v: v if isinstance(v, str) else None)
@pytest.mark.parametrize("warmup", [0, W])
def test_same_curve_as_transformers(name, theirs, ours, warmup):
    scheduler = get_scheduler(
        name, optimizer(), num_warmup_steps=warmup, num_training_steps=T, scheduler_specific_kwargs=dict(theirs)
    )
    expected = torch_curve(scheduler, T + 1)
    schedule = WarmupDecaySchedule(total_steps=T, warmup_steps=warmup, **ours)
    assert our_curve(schedule, T + 1) == pytest.approx(expected, abs=TOL)


TIMM_CASES = [
    {},
    {"lr_min": 1e-5},
    {"cycle_limit": 3},
    {"cycle_limit": 3, "cycle_decay": 0.5, "lr_min": 1e-6},
    {"cycle_limit": 3, "cycle_mul": 2.0},
    {"cycle_limit": 4, "cycle_mul": 1.5, "cycle_decay": 0.7, "lr_min": 2e-5},
    {"warmup_lr_init": 3e-5},
]


@pytest.mark.parametrize("args", TIMM_CASES, ids=str)
@pytest.mark.parametrize("warmup", [0, 16])
def test_same_curve_as_timm_cosine(args, warmup):
    """timm counts t_initial after a warmup_prefix warmup; ours spreads the cycles over total - warmup."""
    t_initial = 40
    cycles = args.get("cycle_limit", 1)
    mul = args.get("cycle_mul", 1.0)
    decay_steps = round(sum(t_initial * mul**i for i in range(cycles)))
    total = warmup + decay_steps
    opt = optimizer()
    timm_scheduler = CosineLRScheduler(
        opt, t_initial=t_initial, warmup_t=warmup, warmup_prefix=True, t_in_epochs=False, **args
    )
    expected = []
    for step in range(total + 20):
        timm_scheduler.step_update(step)
        expected.append(opt.param_groups[0]["lr"])
    schedule = WarmupDecaySchedule(
        total_steps=total,
        warmup_steps=warmup,
        warmup_start_factor=args.get("warmup_lr_init", 0.0) / BASE,
        decay="cosine",
        min_lr=args.get("lr_min", 0.0),
        cycles=cycles,
        cycle_mul=mul,
        cycle_decay=args.get("cycle_decay", 1.0),
    )
    assert our_curve(schedule, total + 20) == pytest.approx(expected, abs=TOL)


def test_timm_without_warmup_prefix_overlays_the_warmup_instead():
    """The documented difference: with timm's default warmup_prefix=False the cosine runs from step 0 under the
    warmup, which equals ours with no warmup from step ``warmup_t`` on."""
    opt = optimizer()
    timm_scheduler = CosineLRScheduler(opt, t_initial=100, warmup_t=10, t_in_epochs=False)
    schedule = WarmupDecaySchedule(total_steps=100, decay="cosine")
    for step in range(10, 100):
        timm_scheduler.step_update(step)
        assert opt.param_groups[0]["lr"] == pytest.approx(schedule.lr(step, BASE), abs=TOL)


@pytest.mark.parametrize(
    "make_torch, ours",
    [
        (lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=30, gamma=0.5),
         {"decay": "step", "step_size": 30, "gamma": 0.5}),
        (lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[50, 120, 200]),
         {"decay": "multistep", "milestones": [50, 120, 200]}),
        (lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.99),
         {"decay": "exponential", "gamma": 0.99}),
        (lambda o: torch.optim.lr_scheduler.PolynomialLR(o, total_iters=T, power=3.0),
         {"decay": "polynomial", "power": 3.0}),
        (lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=T, eta_min=1e-5),
         {"decay": "cosine", "min_lr": 1e-5}),
    ],
)
def test_same_curve_as_torch_without_warmup(make_torch, ours):
    expected = torch_curve(make_torch(optimizer()), T + 1)
    assert our_curve(WarmupDecaySchedule(total_steps=T, **ours), T + 1) == pytest.approx(expected, abs=TOL)


@pytest.mark.parametrize("three_phase, decay, warmup", [(True, "one_cycle", 40), (False, "cosine", 60)])
def test_torch_one_cycle_counted_to_the_last_step(three_phase, decay, warmup):
    """torch's OneCycleLR reaches its peak at step pct_start * total - 1 and its end at total - 1; ours at
    warmup_steps and total_steps, like every other shape. Shifting by one step, the curves are the same: three-phase
    is decay='one_cycle', two-phase is a cosine warmup then a cosine decay."""
    total, div, final_div = 200, 25.0, 1e4
    torch_scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer(), max_lr=BASE, total_steps=total + 1, pct_start=(warmup + 1) / (total + 1), three_phase=three_phase,
        div_factor=div, final_div_factor=final_div, cycle_momentum=False,
    )
    expected = torch_curve(torch_scheduler, total + 1)
    schedule = WarmupDecaySchedule(
        total_steps=total, warmup_steps=warmup, warmup="cosine", warmup_start_factor=1 / div,
        decay=decay, min_lr=BASE / div / final_div,
    )
    assert our_curve(schedule, total + 1) == pytest.approx(expected, abs=TOL)
