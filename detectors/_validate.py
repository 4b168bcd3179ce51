"""Argument checks shared by the package's constructors (one message style everywhere)."""

from __future__ import annotations

import math
from numbers import Integral, Real

from .errors import DetectorConfigError


def real(
    name: str,
    value: object,
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
) -> float:
    """Return ``value`` as a finite float within the given bounds, or raise DetectorConfigError."""
    # bool is an Integral: True as a threshold is almost certainly a wiring mistake.
    if isinstance(value, bool) or not isinstance(value, Real):
        raise DetectorConfigError(f"{name} must be a real number, got {value!r}")
    x = float(value)
    if not math.isfinite(x):
        raise DetectorConfigError(f"{name} must be finite, got {value!r}")
    if lo is not None and (x < lo or (lo_open and x == lo)):
        op = ">" if lo_open else ">="
        raise DetectorConfigError(f"{name} must be {op} {lo:g}, got {value!r}")
    if hi is not None and (x > hi or (hi_open and x == hi)):
        op = "<" if hi_open else "<="
        raise DetectorConfigError(f"{name} must be {op} {hi:g}, got {value!r}")
    return x


def integer(name: str, value: object, *, lo: int | None = None, hi: int | None = None) -> int:
    """Return ``value`` as an int within ``[lo, hi]``, or raise DetectorConfigError."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise DetectorConfigError(f"{name} must be an integer, got {value!r}")
    x = int(value)
    if lo is not None and x < lo:
        raise DetectorConfigError(f"{name} must be >= {lo}, got {value!r}")
    if hi is not None and x > hi:
        raise DetectorConfigError(f"{name} must be <= {hi}, got {value!r}")
    return x


def boolean(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise DetectorConfigError(f"{name} must be a bool, got {value!r}")
    return value


def name(label: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DetectorConfigError(f"{label} must be a non-empty string, got {value!r}")
    return value


def quantile(value: object) -> float:
    return real("quantile", value, lo=0.0, hi=1.0)
