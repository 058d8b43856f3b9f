"""Every warmup and decay shape against its formula, written out independently here, and argument checking."""

from __future__ import annotations

import math

import pytest

from ml_optim_plugins.schedules import WarmupDecaySchedule
from ml_optim_plugins.functional import warmup_factor
from ml_optim_plugins.schedules import DECAY_SHAPES, WARMUP_SHAPES

BASE = 0.2
T, W = 100, 10
STEPS = list(range(0, 131, 3)) + [W - 1, W, W + 1, T - 1, T, T + 1]


def cos_half(p: float) -> float:
    return 0.5 * (1 + math.cos(math.pi * p))


@pytest.mark.parametrize(
    "shape, start, expected",
    [
        ("linear", 0.0, lambda s, p: p),
        ("linear", 0.25, lambda s, p: 0.25 + 0.75 * p),
        ("cosine", 0.1, lambda s, p: 0.1 + 0.9 * (1 - cos_half(p))),
        ("exponential", 0.01, lambda s, p: 0.01 * 100**p),
        ("constant", 0.3, lambda s, p: 0.3),
    ],
)
def test_warmup_shapes_match_their_formula(shape, start, expected):
    for step in range(W):
        assert warmup_factor(step, W, shape, start) == pytest.approx(expected(step, step / W), abs=1e-12)
    assert warmup_factor(W, W, shape, start) == 1.0
    assert warmup_factor(W + 50, W, shape, start) == 1.0


def test_every_warmup_shape_is_covered():
    assert set(WARMUP_SHAPES) == {"linear", "cosine", "exponential", "constant"}


def clamp01(x: float) -> float:
    return min(max(x, 0.0), 1.0)


def progress(step: int) -> float:
    return clamp01((step - W) / (T - W))


# decay name -> (extra schedule arguments, lr(step) for step >= W with min_lr = 0.02)
MIN = 0.02
DECAYS = {
    "constant": ({}, lambda s: BASE),
    "linear": ({}, lambda s: MIN + (BASE - MIN) * (1 - progress(s))),
    "cosine": ({}, lambda s: MIN + (BASE - MIN) * cos_half(progress(s))),
    "polynomial": ({"power": 2.0}, lambda s: MIN + (BASE - MIN) * (1 - progress(s)) ** 2),
    "exponential": ({"gamma": 0.97}, lambda s: MIN + (BASE - MIN) * 0.97 ** (s - W)),
    "step": ({"step_size": 25}, lambda s: MIN + (BASE - MIN) * 0.1 ** ((s - W) // 25)),
    "multistep": ({"milestones": [40, 70], "gamma": 0.5}, lambda s: MIN + (BASE - MIN) * 0.5 ** ((s >= 40) + (s >= 70))),
    "inverse_sqrt": ({}, lambda s: MIN + (BASE - MIN) / math.sqrt((s - W + W) / W)),
    "wsd": (
        {"cooldown_steps": 30, "cooldown": "1-sqrt"},
        lambda s: MIN + (BASE - MIN) * (1 - math.sqrt(clamp01((s - 70) / 30))),
    ),
}


@pytest.mark.parametrize("decay", sorted(DECAYS))
def test_decay_shapes_match_their_formula(decay):
    extra, expected = DECAYS[decay]
    schedule = WarmupDecaySchedule(total_steps=T, warmup_steps=W, decay=decay, min_lr=MIN, **extra)
    for step in STEPS:
        want = BASE * step / W if step < W else expected(step)
        assert schedule.lr(step, BASE) == pytest.approx(want, rel=1e-12, abs=1e-15), step


def test_cosine_with_restarts_growing_cycles_and_decaying_peaks():
    # Cycles of 10, 20, 40 steps after a 10-step warmup (total 80); peaks decay by half each cycle.
    schedule = WarmupDecaySchedule(
        total_steps=80, warmup_steps=10, cycles=3, cycle_mul=2.0, cycle_decay=0.5, min_lr=0.0
    )
    starts, lengths = [10, 20, 40], [10, 20, 40]
    for i, (start, length) in enumerate(zip(starts, lengths)):
        for t in range(length):
            assert schedule.lr(start + t, 1.0) == pytest.approx(0.5**i * cos_half(t / length), abs=1e-12)
    assert schedule.lr(80, 1.0) == 0.0 and schedule.lr(500, 1.0) == 0.0


def test_one_cycle_is_three_phases():
    schedule = WarmupDecaySchedule(total_steps=100, warmup_steps=20, warmup="cosine", warmup_start_factor=0.04,
                                   decay="one_cycle", min_lr=1e-5)
    low = 0.04
    for step in range(20):
        assert schedule.lr(step, 1.0) == pytest.approx(low + (1 - low) * (1 - cos_half(step / 20)))
    for step in range(20, 40):
        assert schedule.lr(step, 1.0) == pytest.approx(low + (1 - low) * cos_half((step - 20) / 20))
    for step in range(40, 101):
        assert schedule.lr(step, 1.0) == pytest.approx(1e-5 + (low - 1e-5) * cos_half((step - 40) / 60))


def test_every_decay_shape_is_covered():
    assert set(DECAY_SHAPES) == set(DECAYS) | {"one_cycle"}


@pytest.mark.parametrize("decay", ["linear", "cosine", "polynomial", "wsd"])
def test_decays_end_at_min_and_hold_it(decay):
    extra = {"cooldown_ratio": 0.2} if decay == "wsd" else {}
    schedule = WarmupDecaySchedule(total_steps=T, warmup_steps=W, decay=decay, min_lr_ratio=0.1, **extra).resolve()
    assert schedule.lr(W, 0.5) == pytest.approx(0.5)
    assert schedule.lr(T, 0.5) == pytest.approx(0.05) and schedule.lr(10 * T, 0.5) == pytest.approx(0.05)


@pytest.mark.parametrize(
    "decay, extra",
    [("linear", {}), ("cosine", {}), ("cosine", {"cycles": 2, "cycle_mul": 2.0}), ("polynomial", {}),
     ("wsd", {"cooldown_steps": 0}), ("one_cycle", {"warmup_start_factor": 0.1})],
)
def test_no_room_to_decay_ends_at_the_floor_without_dividing_by_zero(decay, extra):
    warmup = 5 if decay == "one_cycle" else 10
    schedule = WarmupDecaySchedule(total_steps=10, warmup_steps=warmup, decay=decay, min_lr_ratio=0.1, **extra)
    assert schedule.lr(10, 1.0) == pytest.approx(0.1) and schedule.lr(11, 1.0) == pytest.approx(0.1)


def test_wsd_without_cooldown_holds_the_base_lr_to_the_end():
    schedule = WarmupDecaySchedule(total_steps=10, warmup_steps=2, decay="wsd", cooldown_steps=0, min_lr_ratio=0.1)
    assert [schedule.lr(k, 1.0) for k in range(2, 10)] == [1.0] * 8


def test_ratios_resolve_against_the_total_warmup_up_cooldown_down():
    schedule = WarmupDecaySchedule(warmup_ratio=0.05, decay="wsd", cooldown_ratio=0.1).resolve(1001)
    assert (schedule.total_steps, schedule.warmup_steps, schedule.cooldown_steps) == (1001, 51, 100)  # up, down
    explicit = WarmupDecaySchedule(total_steps=500, warmup_ratio=0.1).resolve(1001)
    assert (explicit.total_steps, explicit.warmup_steps) == (500, 50)


def test_min_lr_ratio_is_relative_to_each_group():
    schedule = WarmupDecaySchedule(total_steps=10, decay="linear", min_lr_ratio=0.5)
    assert schedule.lr(10, 1.0) == 0.5 and schedule.lr(10, 0.1) == pytest.approx(0.05)


def test_late_group_gets_its_own_warmup_on_top_of_the_decay():
    schedule = WarmupDecaySchedule(total_steps=100, warmup_steps=10, decay="linear")
    for step in range(40, 60):
        want = schedule.lr(step, 1.0) * min((step - 40) / 10, 1.0)
        assert schedule.group_lr(step, 1.0, first_step=40) == pytest.approx(want)
    assert schedule.group_lr(45, 1.0, first_step=40, warmup_steps=0) == schedule.lr(45, 1.0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"warmup": "triangle"}, "warmup='triangle' is not a known shape"),
        ({"decay": "cosin"}, "decay='cosin' is not a known shape; expected one of constant, linear, cosine"),
        ({"warmup_steps": -5}, "warmup_steps must be a non-negative integer"),
        ({"total_steps": 0}, "total_steps must be a positive number"),
        ({"warmup_ratio": 1.5}, r"warmup_ratio must be a finite number in \[0, 1\)"),
        ({"warmup_steps": 5, "warmup_ratio": 0.1}, "not both"),
        ({"warmup": "exponential"}, "needs warmup_start_factor > 0"),
        ({"warmup_start_factor": 1.5}, r"warmup_start_factor must be a finite number in \[0, 1\]"),
        ({"min_lr": 1e-5, "min_lr_ratio": 0.1}, "min_lr .* or min_lr_ratio"),
        ({"min_lr": -1.0}, "min_lr must be a finite number >= 0"),
        ({"power": 2.0}, "power=2.0 is only read by decay 'polynomial', not by decay='cosine'"),
        ({"decay": "exponential"}, "needs gamma"),
        ({"decay": "exponential", "gamma": 1.5}, r"gamma must be a finite number in \(0, 1\]"),
        ({"decay": "step"}, "needs step_size"),
        ({"decay": "multistep", "milestones": [50, 20]}, "strictly increasing"),
        ({"decay": "wsd"}, "exactly one of cooldown_steps or cooldown_ratio"),
        ({"decay": "one_cycle", "total_steps": 10}, "needs warmup_start_factor > 0"),
        ({"cycles": 0}, "cycles must be an integer >= 1"),
        ({"cycle_decay": 0.0}, r"cycle_decay must be a finite number in \(0, 1\]"),
    ],
)
def test_bad_arguments_are_rejected_with_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WarmupDecaySchedule(**kwargs)


@pytest.mark.parametrize(
    "kwargs, total, message",
    [
        ({"warmup_steps": 5000}, 1200, r"warmup_steps \(5000\) exceeds the total training steps \(1200\)"),
        ({"decay": "wsd", "warmup_steps": 10, "cooldown_steps": 95}, 100, r"\+ cooldown_steps \(95\) exceed"),
        ({"decay": "one_cycle", "warmup_steps": 60, "warmup_start_factor": 0.1}, 100, "warmup_steps <= 50"),
        ({"decay": "multistep", "warmup_steps": 10, "milestones": [5, 50]}, 100, "must lie after the warmup"),
        ({"decay": "multistep", "milestones": [50, 500]}, 100, "within the run"),
        ({"decay": "cosine"}, None, "needs the total number of optimizer steps"),
        ({"decay": "linear"}, float("inf"), "needs the total number of optimizer steps"),
    ],
)
def test_schedule_that_does_not_fit_the_run_is_rejected(kwargs, total, message):
    with pytest.raises(ValueError, match=message):
        WarmupDecaySchedule(**kwargs).resolve(total)


@pytest.mark.parametrize("decay, extra", [("constant", {}), ("exponential", {"gamma": 0.9}), ("inverse_sqrt", {})])
def test_decays_without_an_end_need_no_total(decay, extra):
    schedule = WarmupDecaySchedule(warmup_steps=4, decay=decay, **extra).resolve(float("inf"))
    assert schedule.total_steps is None and schedule.lr(4, 1.0) == pytest.approx(1.0)


def test_unresolved_schedule_refuses_to_answer():
    with pytest.raises(ValueError, match="call .resolve"):
        WarmupDecaySchedule(warmup_ratio=0.1).lr(3, 1.0)


def test_min_lr_above_a_groups_base_lr_is_rejected():
    with pytest.raises(ValueError, match=r"min_lr \(0.01\) is above the base learning rate of param group 'head'"):
        WarmupDecaySchedule(min_lr=0.01, total_steps=10).check_base_lr(0.001, "'head'")


def test_shrinking_cosine_cycles_hold_the_floor_after_the_end():
    schedule = WarmupDecaySchedule(total_steps=70, decay="cosine", cycles=3, cycle_mul=0.5, min_lr=0.01)
    assert schedule.lr(70, 1.0) == 0.01 and schedule.lr(80, 1.0) == 0.01 and schedule.lr(1000, 1.0) == 0.01


def test_one_cycle_needs_a_warmup():
    with pytest.raises(ValueError, match="give warmup_steps > 0"):
        WarmupDecaySchedule(decay="one_cycle", warmup_start_factor=0.1).resolve(100)


def test_cosine_restart_boundaries_are_exact_over_many_lengths_and_cycles():
    """A step that starts a cycle is at its peak: checked in exact arithmetic for lengths 2..120 and 2..10 cycles
    (floating point put e.g. step 10 of 20 steps in 6 cycles at the floor of cycle 2)."""
    from fractions import Fraction

    from ml_optim_plugins.schedules.shapes import cosine_cycle

    for decay_steps in range(2, 121):
        for cycles in range(2, 11):
            for t in range(decay_steps):
                exact = Fraction(t * cycles, decay_steps)
                i, progress = cosine_cycle(t, decay_steps, cycles)
                assert i == exact.numerator // exact.denominator, (decay_steps, cycles, t)
                assert progress == float(exact - i), (decay_steps, cycles, t)


@pytest.mark.parametrize("cycle_mul", [2.0, 1.5, 0.5])
def test_growing_cycles_start_at_their_peak(cycle_mul):
    from ml_optim_plugins.schedules.shapes import cosine_cycle

    lengths = [cycle_mul**i for i in range(4)]
    decay_steps = sum(lengths) * 8  # every boundary on an integer step
    start = 0.0
    for i, length in enumerate(lengths):
        assert cosine_cycle(start, decay_steps, 4, cycle_mul) == (i, 0.0)
        assert cosine_cycle(start + 4 * length, decay_steps, 4, cycle_mul) == (i, 0.5)
        start += 8 * length
