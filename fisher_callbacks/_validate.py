"""Argument checks shared by the monitors' constructors: every error names the argument.

A bad setting must fail when the callback is built, not at the first validation boundary hours
into a run. :func:`check_choice` suggests the closest option for a typo (``"pooledd"`` ->
``did you mean 'pooled'?``); :func:`check_number` rejects NaN, booleans, non-numbers and values
outside a range (``inf`` only when the range allows it).

    >>> check_choice("fisher", "pooledd", ("task_a", "pooled"))
    Traceback (most recent call last):
    ...
    ValueError: fisher must be one of ('task_a', 'pooled'), got 'pooledd'; did you mean 'pooled'?
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Sequence
from typing import Any


class SetupError(ValueError):
    """A setting that only the fit can check (it names another callback's tasks, say). It stops
    the run: a monitor's own failure is a warning and training goes on, but a mistake in the
    settings is the user's to fix (see :meth:`~fisher_callbacks.engine.ranks.WarningRelay.contain`)."""


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    """``value`` if it is one of ``choices``, else a ``ValueError`` naming ``name``, the options
    and, for a near-miss string, the closest one."""
    if value in tuple(choices):
        return value
    hint = ""
    if isinstance(value, str):
        close = difflib.get_close_matches(value, [str(c) for c in choices], n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}{hint}")


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
    optional: bool = False,
) -> Any:
    """``value`` if it is a real number (an integer when ``integer``) within the bounds, else a
    ``ValueError`` (``TypeError`` for a non-number) naming ``name``.

    Args:
        name: the argument's name, as the user wrote it.
        value: the value given.
        low, high: bounds (``None``: unbounded on that side); closed unless ``low_open`` /
            ``high_open``.
        integer: require an ``int`` (``True``/``False`` never count as numbers).
        optional: accept ``None``.
    """
    if value is None and optional:
        return value
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        what = "an integer" if integer else "a number"
        raise TypeError(f"{name} must be {what}{' or None' if optional else ''}, got {value!r}")
    if math.isnan(value):
        raise ValueError(f"{name} must be a number, got NaN")
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        lo = "(-inf" if low is None else f"{'(' if low_open else '['}{low:g}"
        hi = "inf)" if high is None else f"{high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must lie in {lo}, {hi}, got {value!r}")
    return value
