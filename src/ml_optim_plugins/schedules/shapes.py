"""Warmup and decay shapes as pure functions of the optimizer step.

Nothing here holds state: every function maps a step (and the schedule's arguments) to a factor or a learning rate, so
the same call gives the same value in a fresh process, after a resume, and on every DDP rank.

Conventions shared by every decay:

* ``warmup_steps`` (``W``) steps of warmup come first; the decay starts at step ``W`` with the full base LR, and the
  decays that need a length reach their end value at ``total_steps`` (``T``) and hold it after.
* A decay moves the LR from ``base_lr`` towards ``min_lr``: ``lr = min_lr + (base_lr - min_lr) * d`` with ``d`` going
  from 1 down to its end value (0 for the decays that have an end).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

WARMUP_SHAPES: tuple[str, ...] = ("linear", "cosine", "exponential", "constant")
"""Names accepted by ``warmup=``."""

DECAY_SHAPES: tuple[str, ...] = (
    "constant",
    "linear",
    "cosine",
    "polynomial",
    "exponential",
    "step",
    "multistep",
    "inverse_sqrt",
    "wsd",
    "one_cycle",
)
"""Names accepted by ``decay=``."""

COOLDOWN_SHAPES: tuple[str, ...] = ("linear", "cosine", "1-sqrt")
"""Names accepted by ``cooldown=`` (the final phase of ``decay="wsd"``)."""

DECAYS_NEEDING_TOTAL: frozenset[str] = frozenset({"linear", "cosine", "polynomial", "wsd", "one_cycle"})
"""Decays whose curve depends on the total number of steps."""


def _half_cosine(progress: float) -> float:
    """1 at progress 0, 0 at progress 1, along half a cosine wave."""
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _progress(step: float, start: float, length: float) -> float:
    """Fraction of ``[start, start + length]`` covered at ``step``, clamped to [0, 1]."""
    if length <= 0:
        return 1.0 if step >= start else 0.0
    return min(max((step - start) / length, 0.0), 1.0)


def warmup_factor(step: float, warmup_steps: int, shape: str = "linear", start_factor: float = 0.0) -> float:
    """Multiplier of the base LR during warmup: from ``start_factor`` at step 0 to 1 at ``warmup_steps``.

    Shapes: ``linear`` (straight line), ``cosine`` (half cosine wave, flat at both ends), ``exponential`` (geometric:
    the LR is multiplied by the same factor each step; needs ``start_factor > 0``), ``constant`` (``start_factor``
    for the whole warmup, then a jump to 1, as in the ResNet paper's warmup for very deep nets).

    Args:
        step: optimizer steps since the warmup began.
        warmup_steps: length of the warmup; 0 means no warmup (always 1).
        shape: one of :data:`WARMUP_SHAPES`.
        start_factor: the factor at step 0, in [0, 1].

    Returns:
        The factor, 1.0 from ``warmup_steps`` on.

    Example:
        >>> warmup_factor(5, 10)
        0.5
        >>> round(warmup_factor(5, 10, "exponential", start_factor=0.01), 6)
        0.1
    """
    if step >= warmup_steps:
        return 1.0
    progress = _progress(step, 0, warmup_steps)
    if shape == "linear":
        return start_factor + (1.0 - start_factor) * progress
    if shape == "cosine":
        return start_factor + (1.0 - start_factor) * (1.0 - _half_cosine(progress))
    if shape == "exponential":
        return start_factor ** (1.0 - progress)
    if shape == "constant":
        return start_factor
    raise ValueError(f"unknown warmup shape {shape!r}; expected one of {', '.join(WARMUP_SHAPES)}")


def cosine_cycle(t: float, decay_steps: float, cycles: int = 1, cycle_mul: float = 1.0) -> tuple[int, float]:
    """Which cosine cycle step ``t`` (counted from the end of warmup) falls in, and its progress within that cycle.

    The ``decay_steps`` are split into ``cycles`` cycles whose lengths grow by ``cycle_mul`` (SGDR, Loshchilov & Hutter
    2017). The cycle boundaries are compared in exact rational arithmetic: a step that starts a cycle is at that cycle's
    peak (progress 0) even where floating point would put it at the end of the previous one (20 steps, 6 cycles: step 10
    starts cycle 3), as transformers' ``cosine_with_restarts`` and the mathematics have it.

    Returns:
        ``(i, progress)``: ``i >= cycles`` once the last cycle has ended (progress is then 1).

    Example:
        >>> cosine_cycle(15, 30, cycles=3)
        (1, 0.5)
        >>> cosine_cycle(10, 20, cycles=6)
        (3, 0.0)
    """
    if decay_steps <= 0 or t >= decay_steps:
        return cycles, 1.0  # no room to decay, or past the last cycle: at the end
    mul = Fraction(cycle_mul)
    lengths = [mul**i for i in range(cycles)]
    # Cycle i covers [D * start_i / total, D * (start_i + length_i) / total); multiplied through by total: no rounding.
    scaled_t, steps, start = Fraction(t) * sum(lengths), Fraction(decay_steps), Fraction(0)
    for i, length in enumerate(lengths):
        if scaled_t < steps * (start + length):
            return i, float((scaled_t - steps * start) / (steps * length))
        start += length
    return cycles, 1.0


def decay_lr(
    step: float,
    base_lr: float,
    min_lr: float,
    *,
    decay: str,
    warmup_steps: int = 0,
    total_steps: int | None = None,
    start_factor: float = 0.0,
    cycles: int = 1,
    cycle_mul: float = 1.0,
    cycle_decay: float = 1.0,
    power: float = 1.0,
    gamma: float = 0.1,
    step_size: int = 1,
    milestones: Sequence[int] = (),
    timescale: int = 10_000,
    cooldown_steps: int = 0,
    cooldown: str = "linear",
) -> float:
    """The learning rate at ``step >= warmup_steps`` for decay shape ``decay`` (no argument checking: see
    :class:`~ml_optim_plugins.schedules.WarmupDecaySchedule`, which validates and documents each argument).

    Example:
        >>> decay_lr(10, 1.0, 0.0, decay="linear", warmup_steps=0, total_steps=20)
        0.5
    """
    t = step - warmup_steps
    span = base_lr - min_lr
    if decay == "constant":
        return base_lr
    if decay in ("linear", "polynomial"):
        remaining = 1.0 - _progress(step, warmup_steps, total_steps - warmup_steps)
        return min_lr + span * remaining ** (power if decay == "polynomial" else 1.0)
    if decay == "cosine":
        i, progress = cosine_cycle(t, total_steps - warmup_steps, cycles, cycle_mul)
        if i >= cycles:
            return min_lr
        return min_lr + (base_lr * cycle_decay**i - min_lr) * _half_cosine(progress)
    if decay == "exponential":
        return min_lr + span * gamma**t
    if decay == "step":
        return min_lr + span * gamma ** (t // step_size)
    if decay == "multistep":
        return min_lr + span * gamma ** sum(1 for m in milestones if step >= m)
    if decay == "inverse_sqrt":
        return min_lr + span * math.sqrt(timescale / (t + timescale))
    if decay == "wsd":
        progress = _progress(step, total_steps - cooldown_steps, cooldown_steps)
        if cooldown == "linear":
            remaining = 1.0 - progress
        elif cooldown == "cosine":
            remaining = _half_cosine(progress)
        else:  # "1-sqrt" (Hägele et al. 2024)
            remaining = 1.0 - math.sqrt(progress)
        return min_lr + span * remaining
    if decay == "one_cycle":
        # Three-phase one-cycle (Smith & Topin 2018): after the warmup, back down to the warmup's start LR in as many
        # steps, then annealed to min_lr over the rest.
        if step < 2 * warmup_steps:
            low = base_lr * start_factor
            return low + (base_lr - low) * _half_cosine(_progress(step, warmup_steps, warmup_steps))
        low = base_lr * start_factor
        return min_lr + (low - min_lr) * _half_cosine(_progress(step, 2 * warmup_steps, total_steps - 2 * warmup_steps))
    raise ValueError(f"unknown decay shape {decay!r}; expected one of {', '.join(DECAY_SHAPES)}")
