"""Argument checks shared by the public API: a wrong value raises at once, naming the
parameter and what was expected, instead of giving a silent NaN or a truthy string."""
from __future__ import annotations

import math


def check_bool(name: str, value) -> bool:
    """``value`` if it is a bool (``"False"`` is a string, and truthy: refused)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected True or False, got {value!r}")
    return value


def check_real(name: str, value, *, minimum: float | None = None, positive: bool = False) -> float:
    """``float(value)`` for a finite real number (not a bool), at least ``minimum``, above 0
    when ``positive``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise TypeError(f"{name}: expected a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name}: expected a finite number, got {number}")
    if positive and number <= 0:
        raise ValueError(f"{name}: expected a number > 0, got {number}")
    if minimum is not None and number < minimum:
        raise ValueError(f"{name}: expected a number >= {minimum}, got {number}")
    return number


def check_count(name: str, value, *, minimum: int = 0) -> int:
    """``value`` if it is an integer (not a bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return value


def check_materialized(what: str, tensors) -> None:
    """Refuse tensors on the meta device: they have shapes but no values to compute with."""
    meta = [name for name, t in tensors if getattr(t, "is_meta", False)]
    if meta:
        raise ValueError(f"{what}: {len(meta)} tensor(s) are on the meta device (shapes without values), e.g. "
                         f"{meta[0]!r}; materialize the model first (model.to_empty(device=...) and load its weights)")
