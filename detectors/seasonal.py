"""A daily pattern: whether a level was already reached at about this time of day on each of the last days.

A z-band around a moving mean (EWMA) pages on a daily peak, because its mean trails the cycle: the peak is
far from the mean, yet it is the same peak as yesterday's. :class:`DailyRecurrence` remembers the highest
value of each short time slice over the last ``days`` periods; :class:`RecurringGate` wraps a detector and
turns its anomalous verdict into a normal one when the value is no higher than what the series reached within
``window_s`` of the same time of day on *every* one of the last ``days`` days. A level seen only once before
(yesterday's incident) still pages; a peak that recurs daily does not. The inner detector learns exactly as
it would alone: the gate only changes what is reported.

Memory is bounded: one maximum per slice of ``window_s / 6`` seconds over ``days`` periods plus a window.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque

from . import _validate as check
from .base import Detector, Verdict

__all__ = ["DailyRecurrence", "RecurringGate"]

_DAY_S = 86_400.0
# Slices per window: the window's edges are exact to a sixth of its width.
_SLICES_PER_WINDOW = 6


class DailyRecurrence:
    """The maxima of a series by time slice, over the last ``days`` periods.

    Args:
        days: how many past periods a level must have been reached in (>= 1).
        window_s: how far either side of the same time of the period counts (> 0, under half a period).
        period_s: the period (a day by default).
    """

    def __init__(self, days: int = 2, window_s: float = 1_800.0, *, period_s: float = _DAY_S) -> None:
        self._days = check.integer("days", days, lo=1, hi=365)
        self._period = check.real("period_s", period_s, lo=0.0, lo_open=True)
        self._window = check.real("window_s", window_s, lo=0.0, hi=self._period / 2, lo_open=True, hi_open=True)
        self._slice = self._window / _SLICES_PER_WINDOW
        self._max: dict[int, float] = {}
        self._order: deque[int] = deque()
        self._latest = -math.inf

    @property
    def days(self) -> int:
        return self._days

    @property
    def window_s(self) -> float:
        return self._window

    @property
    def memory(self) -> int:
        """Slices held (bounded by ``days * period_s / (window_s / 6)`` plus a window)."""
        return len(self._max)

    def _index(self, t: float) -> int:
        return math.floor(t / self._slice)

    def add(self, x: float, now: float) -> None:
        """Record ``x`` at ``now``; slices older than ``days`` periods and a window are forgotten."""
        x, t = float(x), max(float(now), self._latest)
        if not math.isfinite(x):
            return
        self._latest = t
        i = self._index(t)
        if i in self._max:
            self._max[i] = max(self._max[i], x)
        else:
            self._max[i] = x
            self._order.append(i)
        oldest = self._index(t - self._days * self._period - self._window)
        while self._order and self._order[0] < oldest:
            del self._max[self._order.popleft()]

    def reached(self, x: float, now: float) -> int:
        """On how many of the last ``days`` periods the series reached ``x`` within ``window_s`` of ``now``'s time."""
        count = 0
        for k in range(1, self._days + 1):
            at = float(now) - k * self._period
            top = max((self._max.get(i, -math.inf) for i in range(self._index(at - self._window),
                                                                     self._index(at + self._window) + 1)),
                      default=-math.inf)
            count += top >= x
        return count

    def recurs(self, x: float, now: float) -> bool:
        """Whether ``x`` was reached near this time of day on every one of the last ``days`` periods."""
        return self.reached(x, now) >= self._days


class RecurringGate:
    """A detector whose anomalous verdicts are reported normal when the value is a recurring daily level.

    Args:
        inner: the detector judged (it learns every value as it would alone).
        days: the level must have been reached on each of this many past days (>= 1).
        window_s: within this long of the same time of day.
        period_s: the period (a day by default).
    """

    def __init__(self, inner: Detector, *, days: int = 2, window_s: float = 1_800.0, period_s: float = _DAY_S) -> None:
        self.inner = inner
        self.recurrence = DailyRecurrence(days, window_s, period_s=period_s)
        self.name = inner.name

    def __repr__(self) -> str:
        return f"RecurringGate({self.inner!r}, days={self.recurrence.days}, window_s={self.recurrence.window_s:g})"

    def __getattr__(self, attr: str):
        # The inner detector's own properties (baseline, warming_up, thresholds) read through; "inner" itself is
        # looked up here only before __init__ set it (copy, pickle), where reading through would recurse.
        if attr == "inner":
            raise AttributeError(attr)
        return getattr(self.inner, attr)

    def score(self) -> float:
        return self.inner.score()

    def update(self, value: float, now: float) -> Verdict | None:
        verdict = self.inner.update(value, now)
        x = float(value)
        if verdict is not None and verdict.anomalous and self.recurrence.recurs(x, now):
            days = self.recurrence.days
            verdict = dataclasses.replace(
                verdict, anomalous=False,
                reason=f"{verdict.reason}; but the series reached {x:.6g} within {self.recurrence.window_s:g} s of this "
                f"time of day on each of the last {days} day{'s' if days > 1 else ''}: a daily pattern, not an anomaly",
            )
        self.recurrence.add(x, now)
        return verdict
