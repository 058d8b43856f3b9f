"""The arguments of a warmup + decay schedule, validated once, and the LR they give at any step."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ml_optim_plugins.hyperparameters import check_number, check_optional_number
from ml_optim_plugins.schedules.shapes import (
    COOLDOWN_SHAPES,
    DECAY_SHAPES,
    DECAYS_NEEDING_TOTAL,
    WARMUP_SHAPES,
    decay_lr,
    warmup_factor,
)

# Arguments that only one family of decays reads, with their defaults: setting one for another decay is a mistake
# (``decay: cosine`` with ``power: 2``) that would otherwise be silently ignored.
_DECAY_ONLY_ARGS: dict[str, tuple[tuple[str, ...], object]] = {
    "cycles": (("cosine",), 1),
    "cycle_mul": (("cosine",), 1.0),
    "cycle_decay": (("cosine",), 1.0),
    "power": (("polynomial",), 1.0),
    "gamma": (("exponential", "step", "multistep"), None),
    "step_size": (("step",), None),
    "milestones": (("multistep",), ()),
    "timescale": (("inverse_sqrt",), None),
    "cooldown_steps": (("wsd",), None),
    "cooldown_ratio": (("wsd",), None),
    "cooldown": (("wsd",), "linear"),
}


def _choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not a known shape; expected one of {', '.join(allowed)}")


def _non_negative_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer number of optimizer steps, got {value!r}")


def _fraction(name: str, value: float | None, *, upper_open: bool = True) -> None:
    check_optional_number(name, value, at_least=0, **({"below": 1} if upper_open else {"at_most": 1}))


@dataclass(frozen=True)
class WarmupDecaySchedule:
    """A warmup followed by a decay, as a pure function of the optimizer step.

    The object only holds (and validates) arguments; :meth:`lr` maps ``(step, base_lr)`` to the learning rate, with no
    state, so :func:`~ml_optim_plugins.warmup_decay_scheduler` and :class:`~ml_optim_plugins.WarmupDecay` give the same
    curve, and a resumed run the same as one that never stopped. Lengths are optimizer steps (not batches, not epochs).
    ``warmup_ratio`` / ``cooldown_ratio`` and a missing ``total_steps`` are filled in by :meth:`resolve` once the
    length of training is known (the callback does this from the Trainer).

    The decay starts after the warmup, with the base LR, and goes to the minimum LR (``min_lr``, or ``min_lr_ratio``
    times each param group's base LR) at ``total_steps``, then holds it. See ``docs/schedules.md`` for a plot of every
    shape and how each relates to transformers', timm's and torch's schedulers.

    Args:
        total_steps: optimizer steps of the whole run, warmup included. Needed by the decays ``linear``, ``cosine``,
            ``polynomial``, ``wsd`` and ``one_cycle`` and by the ratios; the callback derives it from the Trainer.
        warmup_steps: length of the warmup in optimizer steps (0: none).
        warmup_ratio: warmup as a fraction of ``total_steps`` (rounded up, as transformers does); excludes
            ``warmup_steps``.
        warmup: warmup shape, one of ``linear``, ``cosine``, ``exponential``, ``constant``.
        warmup_start_factor: LR factor at step 0 of the warmup, in [0, 1] (> 0 for ``exponential`` and ``one_cycle``).
        decay: decay shape, one of ``constant``, ``linear``, ``cosine``, ``polynomial``, ``exponential``, ``step``,
            ``multistep``, ``inverse_sqrt``, ``wsd`` (warmup-stable-decay), ``one_cycle`` (three-phase).
        min_lr: absolute floor of the decay, the same for every param group; excludes ``min_lr_ratio``.
        min_lr_ratio: floor of the decay as a fraction of each group's base LR, in [0, 1].
        cycles: ``cosine`` only: number of cosine cycles (warm restarts, SGDR) in the decay.
        cycle_mul: ``cosine`` only: each cycle is this many times longer than the previous one.
        cycle_decay: ``cosine`` only: the peak of cycle ``i`` is ``base_lr * cycle_decay**i``.
        power: ``polynomial`` only: exponent of the polynomial (1 is linear).
        gamma: ``exponential`` (required; factor per step), ``step`` and ``multistep`` (factor per drop, default 0.1).
        step_size: ``step`` only: the LR drops every ``step_size`` steps after the warmup.
        milestones: ``multistep`` only: the (absolute, increasing) steps at which the LR drops.
        timescale: ``inverse_sqrt`` only: the LR is ``base_lr * sqrt(timescale / (t + timescale))``, ``t`` steps after
            the warmup; defaults to ``warmup_steps`` (or 10 000 without warmup), as in transformers.
        cooldown_steps: ``wsd`` only: length of the final decay; the LR is constant between warmup and cooldown.
        cooldown_ratio: ``wsd`` only: cooldown as a fraction of ``total_steps`` (rounded down); excludes
            ``cooldown_steps``.
        cooldown: ``wsd`` only: shape of the cooldown, ``linear``, ``cosine`` or ``1-sqrt``.

    Raises:
        ValueError: an unknown shape, a negative length, a factor out of range, two arguments that exclude each other,
            or an argument that the chosen decay does not read.

    Example:
        >>> from ml_optim_plugins.schedules import WarmupDecaySchedule
        >>> schedule = WarmupDecaySchedule(total_steps=100, warmup_steps=10, decay="cosine", min_lr_ratio=0.1)
        >>> [round(schedule.lr(step, base_lr=1e-3), 6) for step in (0, 5, 10, 55, 100, 200)]
        [0.0, 0.0005, 0.001, 0.00055, 0.0001, 0.0001]
    """

    total_steps: int | None = None
    warmup_steps: int = 0
    warmup_ratio: float | None = None
    warmup: str = "linear"
    warmup_start_factor: float = 0.0
    decay: str = "cosine"
    min_lr: float | None = None
    min_lr_ratio: float = 0.0
    cycles: int = 1
    cycle_mul: float = 1.0
    cycle_decay: float = 1.0
    power: float = 1.0
    gamma: float | None = None
    step_size: int | None = None
    milestones: Sequence[int] = ()
    timescale: int | None = None
    cooldown_steps: int | None = None
    cooldown_ratio: float | None = None
    cooldown: str = "linear"

    def __post_init__(self) -> None:
        object.__setattr__(self, "milestones", tuple(self.milestones))
        if isinstance(self.total_steps, float):
            # trainer.estimated_stepping_batches is a float: inf when the run has no end, else a whole number.
            if math.isinf(self.total_steps):
                object.__setattr__(self, "total_steps", None)
            elif self.total_steps.is_integer():
                object.__setattr__(self, "total_steps", int(self.total_steps))
        _choice("warmup", self.warmup, WARMUP_SHAPES)
        _choice("decay", self.decay, DECAY_SHAPES)
        _choice("cooldown", self.cooldown, COOLDOWN_SHAPES)
        for name, (decays, default) in _DECAY_ONLY_ARGS.items():
            if self.decay not in decays and getattr(self, name) != default:
                raise ValueError(
                    f"{name}={getattr(self, name)!r} is only read by decay {' / '.join(map(repr, decays))}, "
                    f"not by decay={self.decay!r}; remove it or change decay"
                )
        if self.total_steps is not None and (
            isinstance(self.total_steps, bool) or not isinstance(self.total_steps, int) or self.total_steps <= 0
        ):
            raise ValueError(f"total_steps must be a positive number of optimizer steps, got {self.total_steps!r}")
        _non_negative_int("warmup_steps", self.warmup_steps)
        _fraction("warmup_ratio", self.warmup_ratio)
        if self.warmup_ratio is not None and self.warmup_steps:
            raise ValueError("give warmup_steps or warmup_ratio, not both")
        _fraction("warmup_start_factor", self.warmup_start_factor, upper_open=False)
        if self.warmup_start_factor == 0 and (self.warmup == "exponential" or self.decay == "one_cycle"):
            what = "warmup='exponential'" if self.warmup == "exponential" else "decay='one_cycle'"
            raise ValueError(
                f"{what} needs warmup_start_factor > 0 (the LR factor at step 0, e.g. 0.01; for one-cycle it is "
                "torch's 1 / div_factor), got 0"
            )
        if self.min_lr is not None and self.min_lr_ratio:
            raise ValueError("give min_lr (absolute) or min_lr_ratio (relative to each group's base LR), not both")
        check_optional_number("min_lr", self.min_lr, at_least=0)
        _fraction("min_lr_ratio", self.min_lr_ratio, upper_open=False)
        self._check_decay_arguments()

    def _check_decay_arguments(self) -> None:
        if isinstance(self.cycles, bool) or not isinstance(self.cycles, int) or self.cycles < 1:
            raise ValueError(f"cycles must be an integer >= 1, got {self.cycles!r}")
        check_number("cycle_mul", self.cycle_mul, above=0)
        check_number("cycle_decay", self.cycle_decay, above=0, at_most=1)
        check_number("power", self.power, above=0)
        if self.decay == "exponential" and self.gamma is None:
            raise ValueError("decay='exponential' needs gamma, the LR factor per optimizer step (e.g. 0.999)")
        check_optional_number("gamma", self.gamma, above=0, at_most=1)
        if self.decay == "step" and (self.step_size is None or self.step_size <= 0):
            raise ValueError(f"decay='step' needs step_size, a positive number of steps, got {self.step_size!r}")
        if self.decay == "multistep":
            ms = self.milestones
            if not ms or any(b <= a for a, b in zip(ms, ms[1:])) or ms[0] <= 0:
                raise ValueError(f"decay='multistep' needs strictly increasing positive milestones, got {list(ms)}")
        check_optional_number("timescale", self.timescale, above=0)
        if self.decay == "wsd":
            if (self.cooldown_steps is None) == (self.cooldown_ratio is None):
                raise ValueError("decay='wsd' needs exactly one of cooldown_steps or cooldown_ratio")
            if self.cooldown_steps is not None:
                _non_negative_int("cooldown_steps", self.cooldown_steps)
            _fraction("cooldown_ratio", self.cooldown_ratio, upper_open=False)

    @classmethod
    def from_arguments(cls, schedule: WarmupDecaySchedule | None = None, **arguments: Any) -> WarmupDecaySchedule:
        """``schedule`` itself, or a schedule built from ``arguments``; the two forms exclude each other.

        Used by :func:`~ml_optim_plugins.warmup_decay_scheduler` and :class:`~ml_optim_plugins.WarmupDecay`, which take
        either. Arguments left at their defaults do not count as given (jsonargparse passes every one of them).

        Raises:
            TypeError: an unknown argument, or a ``schedule`` together with arguments that differ from the defaults.
        """
        defaults = {field.name: field.default for field in dataclasses.fields(cls)}
        unknown = sorted(set(arguments) - set(defaults))
        if unknown:
            raise TypeError(f"unknown schedule argument(s) {unknown}; expected some of {sorted(defaults)}")
        if schedule is None:
            return cls(**arguments)
        given = sorted(
            name
            for name, value in arguments.items()
            if (tuple(value) if name == "milestones" else value) != defaults[name]
        )
        if given:
            raise TypeError(f"give a WarmupDecaySchedule or its arguments, not both (got schedule and {given})")
        return schedule

    @property
    def needs_total_steps(self) -> bool:
        """Whether the curve depends on the length of training."""
        return self.decay in DECAYS_NEEDING_TOTAL or self.warmup_ratio is not None or self.cooldown_ratio is not None

    def resolve(self, total_steps: int | float | None = None) -> WarmupDecaySchedule:
        """Fill in the lengths that depend on the run and check them against it.

        Args:
            total_steps: optimizer steps of the run (e.g. ``trainer.estimated_stepping_batches``); ignored when the
                schedule already has ``total_steps``; ``None`` or ``inf`` when unknown.

        Returns:
            A schedule with ``total_steps`` (if known or needed), ``warmup_steps`` and ``cooldown_steps`` as integers.

        Raises:
            ValueError: when the decay needs a total and none is known, or when warmup (plus cooldown, or the
                one-cycle descent, or a milestone) does not fit in the run.

        Example:
            >>> WarmupDecaySchedule(warmup_ratio=0.1).resolve(1200).warmup_steps
            120
            >>> WarmupDecaySchedule(warmup_steps=5000).resolve(1200)
            Traceback (most recent call last):
            ...
            ValueError: warmup_steps (5000) exceeds the total training steps (1200); lower warmup_steps or raise max_steps / max_epochs
        """
        total = self.total_steps
        if total is None and total_steps is not None and math.isfinite(total_steps):
            total = int(total_steps)
            if total <= 0:
                raise ValueError(f"the run has {total} optimizer steps; a schedule needs at least one")
        if total is None and self.needs_total_steps:
            raise ValueError(
                f"decay={self.decay!r} (or a *_ratio argument) needs the total number of optimizer steps: pass "
                "total_steps, or set the Trainer's max_steps or max_epochs so it can be derived"
            )
        warmup = self.warmup_steps if self.warmup_ratio is None else math.ceil(self.warmup_ratio * total)
        cooldown = self.cooldown_steps
        if self.cooldown_ratio is not None:
            # Rounded down (the warmup is rounded up), so ratios that add up to 1 fit in the run.
            cooldown = math.floor(self.cooldown_ratio * total)
        resolved = dataclasses.replace(
            self, total_steps=total, warmup_steps=warmup, warmup_ratio=None, cooldown_steps=cooldown, cooldown_ratio=None
        )
        resolved._check_fits()
        return resolved

    def _check_fits(self) -> None:
        total, warmup = self.total_steps, self.warmup_steps
        if total is None:
            return
        if warmup > total:
            raise ValueError(
                f"warmup_steps ({warmup}) exceeds the total training steps ({total}); lower warmup_steps or raise "
                "max_steps / max_epochs"
            )
        if self.decay == "wsd" and warmup + self.cooldown_steps > total:
            raise ValueError(
                f"warmup_steps ({warmup}) + cooldown_steps ({self.cooldown_steps}) exceed the total training steps "
                f"({total}); shorten them or train longer"
            )
        if self.decay == "one_cycle" and warmup == 0:
            raise ValueError("decay='one_cycle' climbs during the warmup and comes back down after it; give warmup_steps > 0")
        if self.decay == "one_cycle" and 2 * warmup > total:
            raise ValueError(
                f"decay='one_cycle' climbs for warmup_steps ({warmup}) and comes back down in as many steps, which "
                f"exceeds the total training steps ({total}); use warmup_steps <= {total // 2}"
            )
        if self.decay == "multistep" and (self.milestones[0] <= warmup or self.milestones[-1] > total):
            raise ValueError(
                f"milestones {list(self.milestones)} must lie after the warmup ({warmup} steps) and within the run "
                f"({total} steps)"
            )

    def min_lr_for(self, base_lr: float) -> float:
        """The floor of the decay for a param group whose base LR is ``base_lr``."""
        return self.min_lr if self.min_lr is not None else base_lr * self.min_lr_ratio

    def check_base_lr(self, base_lr: float, group: str) -> None:
        """Raise a ``ValueError`` naming ``group`` if its base LR is negative or below the decay's floor (a base LR
        of 0 is a gated group, e.g. a frozen encoder, and stays 0)."""
        check_number(f"the learning rate of param group {group}", base_lr, at_least=0)
        if self.min_lr is not None and self.min_lr > base_lr > 0:
            raise ValueError(
                f"min_lr ({self.min_lr}) is above the base learning rate of param group {group} ({base_lr}); the "
                "decay would raise the LR. Lower min_lr or use min_lr_ratio"
            )

    def lr(self, step: int, base_lr: float) -> float:
        """The learning rate at optimizer step ``step`` (0-based) for a param group whose base LR is ``base_lr``.

        Raises:
            ValueError: if the schedule still has unresolved ratios or lacks a needed ``total_steps``.
        """
        if self.warmup_ratio is not None or self.cooldown_ratio is not None or (
            self.total_steps is None and self.needs_total_steps
        ):
            raise ValueError("this schedule has ratios or a missing total_steps; call .resolve(total_steps) first")
        if step < self.warmup_steps:
            return base_lr * warmup_factor(step, self.warmup_steps, self.warmup, self.warmup_start_factor)
        return decay_lr(
            step,
            base_lr,
            self.min_lr_for(base_lr),
            decay=self.decay,
            warmup_steps=self.warmup_steps,
            total_steps=self.total_steps,
            start_factor=self.warmup_start_factor,
            cycles=self.cycles,
            cycle_mul=self.cycle_mul,
            cycle_decay=self.cycle_decay,
            power=self.power,
            gamma=self.gamma if self.gamma is not None else 0.1,
            step_size=self.step_size or 1,
            milestones=self.milestones,
            timescale=self.timescale or self.warmup_steps or 10_000,
            cooldown_steps=self.cooldown_steps or 0,
            cooldown=self.cooldown,
        )

    def group_lr(self, step: int, base_lr: float, first_step: int = 0, warmup_steps: int | None = None) -> float:
        """The LR of a param group that joined the optimizer at ``first_step`` (e.g. an unfrozen encoder).

        A group present from the start follows :meth:`lr`. A later group follows it too, multiplied by its own warmup
        (same shape and start factor, ``warmup_steps`` long, default the schedule's) counted from ``first_step``, so
        newly trainable weights are not hit by the full LR on their first step. A base LR of 0 (a gated group) gives 0.

        Example:
            >>> s = WarmupDecaySchedule(warmup_steps=10, decay="constant")
            >>> s.group_lr(50, 1.0, first_step=45), s.group_lr(60, 1.0, first_step=45)
            (0.5, 1.0)
        """
        if base_lr == 0:
            return 0.0  # a gated group (frozen encoder) stays at 0, whatever the decay's floor
        lr = self.lr(step, base_lr)
        if first_step <= 0:
            return lr
        length = self.warmup_steps if warmup_steps is None else warmup_steps
        return lr * warmup_factor(step - first_step, length, self.warmup, self.warmup_start_factor)
