"""Threshold rules with a ``for`` duration, evaluated like Prometheus alerting rules.

A rule watches one value (a window's p95, an error ratio, a memory percentage, a rate) and moves
between three states:

* ``INACTIVE``: the condition does not hold.
* ``PENDING``: it holds, but not yet for ``for_s`` seconds.
* ``FIRING``: it has held at every evaluation for at least ``for_s`` seconds.

A value that stops breaching sends the rule back to ``INACTIVE`` at once, unless it was firing and
``keep_firing_for_s > 0``: then it keeps firing until the condition has been clear that long
(Prometheus' ``keep_firing_for``), which stops a value hovering at the threshold from flapping.

Missing data. A NaN value means "no data" (for example a percentile of an empty window). With
``nan_policy="reset"`` (default, as Prometheus does when a series disappears) the rule goes
``INACTIVE``; with ``"hold"`` the state and its timers are left as they are.

``threshold``, ``for_s`` and ``keep_firing_for_s`` can be changed at runtime; the new values apply
from the next evaluation. Comparisons are strict (``>`` for ``above=True``, ``<`` otherwise).

The four rules of requirement 10, and what to feed them on each tick::

    latency = latency_above(0.5, quantile=0.95, for_s=60)   # value: window.quantiles([0.95], now)[0]
    errors = error_rate_above(0.05, for_s=60)               # value: ratio_window.ratio(now)
    gpu_mem = memory_percent_above(90.0, for_s=120)         # value: used / total * 100
    slow = throughput_below(5.0, for_s=120)                 # value: window.rate(now)

    state = latency.evaluate(window.quantiles([0.95], now)[0], now)
"""

from __future__ import annotations

import enum
import math
from typing import Literal

from . import _validate as check
from .errors import DetectorConfigError

__all__ = [
    "RuleState",
    "ThresholdRule",
    "error_rate_above",
    "latency_above",
    "memory_percent_above",
    "throughput_below",
]

NanPolicy = Literal["reset", "hold"]


class RuleState(enum.StrEnum):
    """A rule's state; the values are Prometheus' alert state names."""

    INACTIVE = "inactive"
    PENDING = "pending"
    FIRING = "firing"


class ThresholdRule:
    """Fires when a value stays above (or below) a threshold for ``for_s`` seconds.

    Args:
        name: identifies the rule (e.g. the alert name).
        threshold: the limit; finite.
        above: True fires on ``value > threshold``, False on ``value < threshold``.
        for_s: how long the condition must hold before firing (>= 0; 0 fires on the first breach).
        keep_firing_for_s: how long a firing rule keeps firing once the condition clears (>= 0).
        nan_policy: ``"reset"`` (NaN -> INACTIVE) or ``"hold"`` (NaN leaves the state alone).
        signal: what the value is, for humans (``"p95 latency (s)"``); used in :meth:`describe`.

    Time never runs backwards inside a rule: a ``now`` earlier than the last one is read as the last.
    Not thread-safe: one owner evaluates it.
    """

    def __init__(
        self,
        *,
        name: str,
        threshold: float,
        above: bool = True,
        for_s: float = 0.0,
        keep_firing_for_s: float = 0.0,
        nan_policy: NanPolicy = "reset",
        signal: str = "value",
    ) -> None:
        self.name = check.name("name", name)
        self.threshold = threshold
        self._above = check.boolean("above", above)
        self.for_s = for_s
        self.keep_firing_for_s = keep_firing_for_s
        if nan_policy not in ("reset", "hold"):
            raise DetectorConfigError(f"nan_policy must be 'reset' or 'hold', got {nan_policy!r}")
        self._nan_policy: NanPolicy = nan_policy
        self.signal = check.name("signal", signal)
        self._state = RuleState.INACTIVE
        self._active_since: float | None = None
        self._firing_since: float | None = None
        self._clear_since: float | None = None
        self._last_value = math.nan
        self._last_now: float | None = None

    def __repr__(self) -> str:
        op = ">" if self._above else "<"
        return (
            f"ThresholdRule(name={self.name!r}, {self.signal} {op} {self._threshold:g}, "
            f"for_s={self._for_s:g}, state={self._state.value})"
        )

    # -- runtime-settable parameters ------------------------------------------------------

    @property
    def threshold(self) -> float:
        return self._threshold

    @threshold.setter
    def threshold(self, value: float) -> None:
        self._threshold = check.real("threshold", value)

    @property
    def for_s(self) -> float:
        return self._for_s

    @for_s.setter
    def for_s(self, value: float) -> None:
        self._for_s = check.real("for_s", value, lo=0.0)

    @property
    def keep_firing_for_s(self) -> float:
        return self._keep_s

    @keep_firing_for_s.setter
    def keep_firing_for_s(self, value: float) -> None:
        self._keep_s = check.real("keep_firing_for_s", value, lo=0.0)

    # -- state ------------------------------------------------------------------------------

    @property
    def above(self) -> bool:
        return self._above

    @property
    def nan_policy(self) -> NanPolicy:
        return self._nan_policy

    @property
    def state(self) -> RuleState:
        return self._state

    @property
    def active_since(self) -> float | None:
        """When the current breach began (None while INACTIVE)."""
        return self._active_since

    @property
    def firing_since(self) -> float | None:
        """When the rule last started firing (None unless FIRING)."""
        return self._firing_since

    @property
    def last_value(self) -> float:
        """The latest value evaluated (NaN before the first)."""
        return self._last_value

    @property
    def last_evaluated(self) -> float | None:
        return self._last_now

    def breaches(self, value: float) -> bool:
        """Whether ``value`` breaches the threshold (NaN never does)."""
        v = float(value)
        return v > self._threshold if self._above else v < self._threshold

    def reset(self) -> None:
        """Back to INACTIVE, forgetting timers and the last value."""
        self._to_inactive()
        self._last_value = math.nan
        self._last_now = None

    def evaluate(self, value: float, now: float) -> RuleState:
        """Judge ``value`` observed at ``now`` and return the new state."""
        t = float(now)
        if not math.isfinite(t):
            raise DetectorConfigError(f"now must be finite, got {now!r}")
        if self._last_now is not None and t < self._last_now:
            t = self._last_now
        self._last_now = t
        v = float(value)
        self._last_value = v
        if math.isnan(v):
            if self._nan_policy == "reset":
                self._to_inactive()
            return self._state
        if self.breaches(v):
            self._clear_since = None
            if self._state is RuleState.INACTIVE:
                self._state = RuleState.PENDING
                self._active_since = t
            if self._state is RuleState.PENDING and t - self._active_since >= self._for_s:  # type: ignore[operator]
                self._state = RuleState.FIRING
                self._firing_since = t
            return self._state
        if self._state is RuleState.FIRING and self._keep_s > 0.0:
            if self._clear_since is None:
                self._clear_since = t
            if t - self._clear_since < self._keep_s:
                return self._state
        self._to_inactive()
        return self._state

    def _to_inactive(self) -> None:
        self._state = RuleState.INACTIVE
        self._active_since = None
        self._firing_since = None
        self._clear_since = None

    def describe(self) -> str:
        """One line for an alert annotation: what is compared with what, and since when."""
        op = ">" if self._above else "<"
        line = f"{self.name}: {self.signal} {self._last_value:.6g} {op} {self._threshold:g}"
        if self._for_s:
            line += f" for {self._for_s:g}s"
        return f"{line} ({self._state.value})"


def _default_name(name: str | None, fallback: str) -> str:
    return fallback if name is None else name


def latency_above(
    threshold_s: float,
    *,
    quantile: float = 0.95,
    for_s: float = 60.0,
    keep_firing_for_s: float = 0.0,
    name: str | None = None,
) -> ThresholdRule:
    """Latency: a quantile of a latency window above ``threshold_s`` seconds (10.1).

    Feed ``window.quantiles([quantile], now)[0]``; an empty window gives NaN, which resets the rule.
    """
    thr = check.real("threshold_s", threshold_s, lo=0.0)
    q = check.quantile(quantile)
    label = f"p{q * 100:g}".replace(".", "_")
    return ThresholdRule(
        name=_default_name(name, f"latency_{label}_above"),
        threshold=thr,
        above=True,
        for_s=for_s,
        keep_firing_for_s=keep_firing_for_s,
        signal=f"{label} latency (s)",
    )


def error_rate_above(
    threshold: float, *, for_s: float = 60.0, keep_firing_for_s: float = 0.0, name: str | None = None
) -> ThresholdRule:
    """Error rate: the error ratio of a window above ``threshold`` (a fraction in [0, 1]) (10.2).

    Feed ``ratio_window.ratio(now)``.
    """
    thr = check.real("threshold", threshold, lo=0.0, hi=1.0)
    return ThresholdRule(
        name=_default_name(name, "error_rate_above"),
        threshold=thr,
        above=True,
        for_s=for_s,
        keep_firing_for_s=keep_firing_for_s,
        signal="error ratio",
    )


def memory_percent_above(
    threshold_pct: float,
    *,
    for_s: float = 60.0,
    keep_firing_for_s: float = 0.0,
    name: str | None = None,
) -> ThresholdRule:
    """Memory: GPU or host memory in use above ``threshold_pct`` percent (0..100) (10.3).

    Feed ``100 * used / total`` (NVML framebuffer or psutil ``virtual_memory().percent``).
    """
    thr = check.real("threshold_pct", threshold_pct, lo=0.0, hi=100.0)
    return ThresholdRule(
        name=_default_name(name, "memory_percent_above"),
        threshold=thr,
        above=True,
        for_s=for_s,
        keep_firing_for_s=keep_firing_for_s,
        signal="memory used (%)",
    )


def throughput_below(
    min_per_s: float, *, for_s: float = 60.0, keep_firing_for_s: float = 0.0, name: str | None = None
) -> ThresholdRule:
    """Throughput: a window's rate below ``min_per_s`` per second (10.4).

    Feed ``window.rate(now)``. A window younger than its horizon under-reads its rate, so feed NaN
    (which resets the rule) until the window has covered one horizon.
    """
    thr = check.real("min_per_s", min_per_s, lo=0.0)
    return ThresholdRule(
        name=_default_name(name, "throughput_below"),
        threshold=thr,
        above=False,
        for_s=for_s,
        keep_firing_for_s=keep_firing_for_s,
        signal="throughput (/s)",
    )
