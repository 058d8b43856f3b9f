"""Checks of numeric hyperparameters, shared by every constructor: a real number in its range, or an error naming it.

A plain ``if alpha < 0`` lets NaN through (every comparison with NaN is false), and ``inf`` through most upper bounds;
both then surface far from their cause ("lower the learning rate" at step 40). These checks reject them where the
value is given, with the argument's name, its value and the range expected.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from numbers import Integral, Real


def _range_text(at_least: float | None, above: float | None, at_most: float | None, below: float | None) -> str:
    low = f"[{at_least:g}" if at_least is not None else f"({above:g}" if above is not None else None
    high = f"{at_most:g}]" if at_most is not None else f"{below:g})" if below is not None else None
    if low and high:
        return f"in {low}, {high}"
    if low:
        return f">= {at_least:g}" if at_least is not None else f"> {above:g}"
    if high:
        return f"<= {at_most:g}" if at_most is not None else f"< {below:g}"
    return ""


def check_number(
    name: str,
    value: object,
    *,
    at_least: float | None = None,
    above: float | None = None,
    at_most: float | None = None,
    below: float | None = None,
    allow_inf: bool = False,
) -> float:
    """Return ``value`` as a float if it is a real number (not NaN; not infinite unless ``allow_inf``) within the
    bounds, else raise a ``ValueError`` naming ``name``, the value and the range expected.

    Args:
        name: the argument's name as the user wrote it (``"alpha"``, ``"lr_multipliers['text']"``).
        value: the value given.
        at_least: inclusive lower bound.
        above: exclusive lower bound.
        at_most: inclusive upper bound.
        below: exclusive upper bound.
        allow_inf: accept ``+inf`` / ``-inf`` where they mean something (a max-norm, a disabled threshold).

    Raises:
        ValueError: NaN, an infinity not allowed, a bool or non-number, or a value outside the bounds.

    Example:
        >>> check_number("alpha", 0.5, at_least=0)
        0.5
        >>> check_number("alpha", float("nan"), at_least=0)
        Traceback (most recent call last):
        ...
        ValueError: alpha must be a finite number >= 0, got nan
        >>> check_number("p", 1.0, at_least=0, below=1)
        Traceback (most recent call last):
        ...
        ValueError: p must be a finite number in [0, 1), got 1.0
    """
    number = value if isinstance(value, Real) and not isinstance(value, bool) else None
    valid = number is not None and not math.isnan(number) and (allow_inf or math.isfinite(number))
    if valid:
        valid = (
            (at_least is None or number >= at_least)
            and (above is None or number > above)
            and (at_most is None or number <= at_most)
            and (below is None or number < below)
        )
    if not valid:
        kind = "a number" if allow_inf else "a finite number"
        bounds = _range_text(at_least, above, at_most, below)
        raise ValueError(f"{name} must be {kind}{' ' + bounds if bounds else ''}, got {value!r}")
    return float(number)


def check_integer(name: str, value: object, *, at_least: int = 0) -> int:
    """Return ``value`` if it is an integer (not a bool, not a float such as NaN) ``>= at_least``, else raise a
    ``ValueError`` naming it. For counts and intervals, where a float NaN would silently never match (``step % nan``).

    Example:
        >>> check_integer("patience", 2, at_least=1)
        2
        >>> check_integer("log_every_n_steps", float("nan"), at_least=1)
        Traceback (most recent call last):
        ...
        ValueError: log_every_n_steps must be an integer >= 1, got nan
    """
    if isinstance(value, bool) or not isinstance(value, Integral) or value < at_least:
        raise ValueError(f"{name} must be an integer >= {at_least}, got {value!r}")
    return int(value)


def check_optional_number(name: str, value: object, **bounds: float | bool | None) -> float | None:
    """:func:`check_number` for an argument that may be ``None`` (returned as is).

    Example:
        >>> check_optional_number("max_gap", None, above=0) is None
        True
    """
    return None if value is None else check_number(name, value, **bounds)


def check_numbers(name: str, values: Mapping[str, object], **bounds: float | bool | None) -> dict[str, float]:
    """:func:`check_number` for every entry of a mapping, each named ``name[key]``; returns a plain dict of floats.

    Example:
        >>> check_numbers("lr_multipliers", {"text": 0.3}, at_least=0)
        {'text': 0.3}
        >>> check_numbers("lr_multipliers", {"text": float("nan")}, at_least=0)
        Traceback (most recent call last):
        ...
        ValueError: lr_multipliers['text'] must be a finite number >= 0, got nan
    """
    return {key: check_number(f"{name}[{key!r}]", value, **bounds) for key, value in values.items()}


def check_rate(p: object, name: str = "p") -> float:
    """Return ``p`` as a float if it is a dropout rate in [0, 1), else raise a ``ValueError`` saying why (``p = 1``
    drops everything: nothing reaches the next layer, and Gaussian dropout's variance ``p / (1 - p)`` is infinite).

    Example:
        >>> check_rate(0.2)
        0.2
        >>> check_rate(1.0, "dropout")
        Traceback (most recent call last):
        ...
        ValueError: dropout must be a dropout rate in [0, 1), got 1.0; a rate of 1 drops every unit (Gaussian dropout: infinite noise variance p / (1 - p)), so nothing trains
    """
    try:
        return check_number(name, p, at_least=0, below=1)
    except ValueError:
        drop_all = (
            "; a rate of 1 drops every unit (Gaussian dropout: infinite noise variance p / (1 - p)), so nothing trains"
            if p == 1
            else ""
        )
        raise ValueError(f"{name} must be a dropout rate in [0, 1), got {p!r}{drop_all}") from None
