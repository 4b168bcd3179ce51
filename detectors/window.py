"""Time-based rolling windows with bounded memory: latency percentiles, throughput, error ratios.

Every method takes ``now`` (seconds on any monotonic clock) and does no I/O. A sample added at ``t``
counts while ``t > now - horizon_s``; once it is ``horizon_s`` old it never counts again.

Exactness. A window keeps up to ``max_samples`` raw samples in a ring buffer. While the samples
inside the horizon fit, every statistic is exact and the quantiles equal
``numpy.quantile(values, q, method="linear")``. When more arrive within one horizon, the oldest
in-horizon samples move, in chunks, into time slices of a DDSketch-style log-bucket sketch
(``relative_accuracy``, default 1%) and the window reports ``error_bound = relative_accuracy``:

* quantiles are within relative error ``relative_accuracy`` of the exact value at each rank
  (magnitudes at or below 1e-9 read as 0.0; see ``_sketch``), min, max, mean and count stay exact
  over the samples counted;
* a slice is dropped as soon as its oldest sample leaves the horizon, so samples older than the
  horizon still never count; the price is that up to one slice width (``horizon_s / slices``) of
  the newest-expiring samples is dropped early, and ``rate`` divides by the span actually covered.

The window is exact again once the sketched samples have aged out. Memory is at most
``max_samples`` raw samples (16 bytes each) plus ``slices + 1`` sketches of bounded key range.

Why one module of about 540 lines: the ring buffer, the time slices and the sketch share one invariant (a sample
counts exactly once, raw or sketched, until it leaves the horizon), kept by the code that moves samples between them.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from . import _validate as check
from ._sketch import LogMapping, Slice
from .errors import DetectorConfigError, UnknownWindowError

__all__ = [
    "DEFAULT_HORIZONS",
    "MultiRatioWindow",
    "MultiWindow",
    "RatioWindow",
    "RollingWindow",
    "WindowStats",
]

#: The horizons the sidecar shows by default: 10 s, 1 min, 5 min.
DEFAULT_HORIZONS: Mapping[str, float] = {"10s": 10.0, "1m": 60.0, "5m": 300.0}

_INITIAL_CAPACITY = 256
# Evicting in chunks keeps the per-sample cost of overflow near the cost of a plain add.
_EVICT_FRACTION = 16
_SNAPSHOT_QS = (0.5, 0.95, 0.99)
_NAN = math.nan


@dataclass(frozen=True, slots=True)
class WindowStats:
    """A window's statistics at one instant. NaN fields mean the window was empty.

    ``error_bound`` is 0.0 when every figure is exact, else the relative error bound of the
    percentiles (see the module docstring).
    """

    count: int
    rate_per_s: float
    mean: float
    min: float
    max: float
    p50: float
    p95: float
    p99: float
    error_bound: float

    @property
    def exact(self) -> bool:
        return self.error_bound == 0.0


def _lerp(a: float, b: float, t: float) -> float:
    # numpy's formula, so exact results match numpy.quantile(method="linear") to the last bit.
    d = b - a
    return b - d * (1.0 - t) if t >= 0.5 else a + d * t


class RollingWindow:
    """Time-based window of float samples (e.g. latency seconds) with bounded memory.

    Args:
        horizon_s: how far back the window reaches, in seconds (> 0).
        max_samples: raw samples kept; statistics are exact while the horizon holds no more.
        relative_accuracy: percentile error bound once the horizon holds more (0.001..0.1).
        slices: time slices of the overflow sketch; the early-drop granularity is
            ``horizon_s / slices`` (2..10000).

    Time never runs backwards inside a window: a ``now`` earlier than the latest one seen is
    read as the latest. Non-finite values (or a non-finite ``now`` in ``add``) are dropped and
    counted in :attr:`rejected`; a non-finite ``now`` in a query raises DetectorConfigError.
    Not thread-safe: one owner (the sidecar's loop) adds and queries.
    """

    def __init__(
        self,
        *,
        horizon_s: float,
        max_samples: int = 100_000,
        relative_accuracy: float = 0.01,
        slices: int = 60,
    ) -> None:
        self._horizon = check.real("horizon_s", horizon_s, lo=0.0, lo_open=True)
        self._max = check.integer("max_samples", max_samples, lo=1, hi=100_000_000)
        self._alpha = check.real("relative_accuracy", relative_accuracy, lo=0.001, hi=0.1)
        self._n_slices = check.integer("slices", slices, lo=2, hi=10_000)
        self._width = self._horizon / self._n_slices
        self._cap = min(self._max, _INITIAL_CAPACITY)
        self._t = np.empty(self._cap)
        self._v = np.empty(self._cap)
        self._head = 0
        self._n = 0
        self._latest = -math.inf
        self._slices: deque[Slice] = deque()
        self._mapping: LogMapping | None = None
        self._lost_until = -math.inf
        self._rejected = 0
        self._version = 0
        self._cache_key: tuple | None = None
        self._cache_val: tuple[float, ...] = ()

    def __repr__(self) -> str:
        return (
            f"RollingWindow(horizon_s={self._horizon:g}, max_samples={self._max}, "
            f"relative_accuracy={self._alpha:g}, slices={self._n_slices})"
        )

    @property
    def horizon_s(self) -> float:
        return self._horizon

    @property
    def max_samples(self) -> int:
        return self._max

    @property
    def relative_accuracy(self) -> float:
        return self._alpha

    @property
    def slices(self) -> int:
        return self._n_slices

    @property
    def rejected(self) -> int:
        """Samples dropped because the value or ``now`` was not finite."""
        return self._rejected

    # -- ingestion -------------------------------------------------------------------------

    def add(self, value: float, now: float) -> None:
        """Record one sample observed at ``now``."""
        v = float(value)
        t = float(now)
        if not (math.isfinite(v) and math.isfinite(t)):
            self._rejected += 1
            return
        if t > self._latest:
            self._latest = t
        else:
            t = self._latest
        if self._n == self._cap:
            self._make_room(t)
        i = self._head + self._n
        if i >= self._cap:
            i -= self._cap
        self._t[i] = t
        self._v[i] = v
        self._n += 1
        self._version += 1

    def _make_room(self, t: float) -> None:
        self._expire(t - self._horizon)
        if self._n < self._cap:
            return
        if self._cap < self._max:
            self._resize(min(self._cap * 2, self._max))
            return
        self._evict(max(1, self._max // _EVICT_FRACTION))

    def _resize(self, cap: int) -> None:
        t = np.empty(cap)
        v = np.empty(cap)
        t[: self._n] = self._ordered(self._t)
        v[: self._n] = self._ordered(self._v)
        self._t, self._v, self._cap, self._head = t, v, cap, 0

    def _ordered(self, arr: np.ndarray, k: int | None = None) -> np.ndarray:
        """The oldest ``k`` (default: all) live entries of ``arr`` in time order (a view when possible)."""
        n = self._n if k is None else k
        h = self._head
        end = h + n
        if end <= self._cap:
            return arr[h:end]
        return np.concatenate((arr[h:], arr[: end - self._cap]))

    def _evict(self, k: int) -> None:
        """Move the ``k`` oldest raw samples into the overflow sketch."""
        if self._mapping is None:
            self._mapping = LogMapping(self._alpha)
        ts = self._ordered(self._t, k)
        vs = self._ordered(self._v, k)
        i = 0
        while i < k:
            s = self._slices[-1] if self._slices else None
            if s is None or ts[i] >= s.t_first + self._width:
                s = Slice(float(ts[i]))
                self._slices.append(s)
            # ts[i] < limit, so j > i: every pass absorbs at least one sample.
            j = int(np.searchsorted(ts, s.t_first + self._width, side="left"))
            s.absorb(ts[i:j], vs[i:j], self._mapping)
            i = j
        self._head = (self._head + k) % self._cap
        self._n -= k
        self._version += 1

    def _expire(self, cutoff: float) -> None:
        """Forget everything at or before ``cutoff``."""
        n = self._n
        if n and self._t[self._head] <= cutoff:
            h, cap = self._head, self._cap
            end = h + n
            if end <= cap:
                k = int(np.searchsorted(self._t[h:end], cutoff, side="right"))
            else:
                k = int(np.searchsorted(self._t[h:], cutoff, side="right"))
                if k == cap - h:
                    k += int(np.searchsorted(self._t[: end - cap], cutoff, side="right"))
            self._n = n - k
            self._head = 0 if self._n == 0 else (h + k) % cap
            self._version += 1
        slices = self._slices
        while slices and slices[0].t_first <= cutoff:
            s = slices.popleft()
            # Dropped whole so an old sample never counts; remember the in-horizon part it took along.
            if s.t_last > self._lost_until:
                self._lost_until = s.t_last
            self._version += 1

    # -- queries ---------------------------------------------------------------------------

    def _at(self, now: float) -> float:
        t = float(now)
        if not math.isfinite(t):
            raise DetectorConfigError(f"now must be finite, got {now!r}")
        if t > self._latest:
            self._latest = t
        else:
            t = self._latest
        self._expire(t - self._horizon)
        return t

    def _count(self) -> int:
        return self._n + sum(s.n for s in self._slices)

    def _span(self, t: float) -> float:
        if self._lost_until > t - self._horizon:
            return max(t - self._lost_until, self._width)
        return self._horizon

    def count(self, now: float) -> int:
        """Samples in the window."""
        self._at(now)
        return self._count()

    def rate(self, now: float) -> float:
        """Samples per second over the horizon (over the span covered, while sketched samples were dropped early)."""
        t = self._at(now)
        return self._count() / self._span(t)

    def exact(self, now: float) -> bool:
        """True while every statistic of the window is exact."""
        self._at(now)
        return not self._slices

    def error_bound(self, now: float) -> float:
        """0.0 when exact, else the relative error bound of the percentiles."""
        return 0.0 if self.exact(now) else self._alpha

    def mean(self, now: float) -> float:
        """Mean of the samples in the window; NaN when empty."""
        self._at(now)
        n, total = self._moments()
        return total / n if n else _NAN

    def _moments(self) -> tuple[int, float]:
        n = self._count()
        if not n:
            return 0, 0.0
        total = float(self._ordered(self._v).sum()) if self._n else 0.0
        return n, total + sum(s.total for s in self._slices)

    def quantiles(self, qs: Sequence[float], now: float) -> list[float]:
        """Quantiles ``qs`` (each in [0, 1]) of the window; NaN when empty.

        Exact windows use numpy's ``method="linear"`` definition; otherwise see the module docstring.
        """
        qv = tuple(check.quantile(q) for q in qs)
        self._at(now)
        return list(self._quantiles(qv))

    def snapshot(self, now: float) -> WindowStats:
        """Count, rate, mean, min, max, p50, p95 and p99 in one pass."""
        t = self._at(now)
        p50, p95, p99 = self._quantiles(_SNAPSHOT_QS)
        lo, hi = self._extremes()
        n, total = self._moments()
        return WindowStats(
            count=n,
            rate_per_s=n / self._span(t),
            mean=total / n if n else _NAN,
            min=lo,
            max=hi,
            p50=p50,
            p95=p95,
            p99=p99,
            error_bound=self._alpha if self._slices else 0.0,
        )

    def _quantiles(self, qv: tuple[float, ...]) -> tuple[float, ...]:
        """Quantiles of the current contents; cached until the contents change."""
        key = (self._version, qv)
        if key == self._cache_key:
            return self._cache_val
        if not qv:
            result: tuple[float, ...] = ()
        elif self._n == 0 and not self._slices:
            result = tuple(_NAN for _ in qv)
        elif not self._slices:
            result = self._exact_quantiles(qv)
        else:
            result = self._sketch_quantiles(qv)
        self._cache_key, self._cache_val = key, result
        return result

    def _extremes(self) -> tuple[float, float]:
        lo, hi = math.inf, -math.inf
        if self._n:
            raw = self._ordered(self._v)
            lo, hi = float(raw.min()), float(raw.max())
        for s in self._slices:
            lo = min(lo, s.lo)
            hi = max(hi, s.hi)
        return (lo, hi) if lo <= hi else (_NAN, _NAN)

    def _exact_quantiles(self, qv: tuple[float, ...]) -> tuple[float, ...]:
        arr = self._ordered(self._v)
        n = arr.size
        virtual = [q * (n - 1) for q in qv]
        lo = [int(x) for x in virtual]
        hi = [min(i + 1, n - 1) for i in lo]
        # Partitioning only at the ranks needed is what keeps a 10k-sample query near 50 us.
        part = np.partition(arr, sorted({*lo, *hi}))
        return tuple(_lerp(float(part[i]), float(part[j]), x - i) for x, i, j in zip(virtual, lo, hi))

    def _sketch_quantiles(self, qv: tuple[float, ...]) -> tuple[float, ...]:
        mapping = self._mapping
        assert mapping is not None
        k_max = mapping.k_max
        dense = np.bincount(mapping.keys(self._ordered(self._v)) + k_max, minlength=2 * k_max + 1)
        for s in self._slices:
            dense[s.keys + k_max] += s.counts
        cum = np.cumsum(dense)
        n = int(cum[-1])
        lo_v, hi_v = self._extremes()
        virtual = [q * (n - 1) for q in qv]
        lo = [int(x) for x in virtual]
        hi = [min(i + 1, n - 1) for i in lo]
        ranks = np.array(lo + hi, dtype=np.int64)
        reps = mapping.values(np.searchsorted(cum, ranks, side="right") - k_max)
        # The extremes are known exactly; clamping to them only ever reduces the error.
        reps = np.clip(reps, lo_v, hi_v)
        reps[ranks == 0] = lo_v
        reps[ranks == n - 1] = hi_v
        m = len(qv)
        return tuple(_lerp(float(reps[i]), float(reps[m + i]), virtual[i] - lo[i]) for i in range(m))


class RatioWindow:
    """Time-based window of outcomes for error rates: ``add(ok, now)``, ``ratio(now)``.

    ``ratio`` is the fraction of outcomes in the window that were *not* ok (the error ratio);
    ``success_ratio`` is its complement. Both are NaN when the window is empty. Exact while the
    horizon holds at most ``max_samples`` outcomes; beyond that the ratio stays exact over the
    outcomes counted, but up to ``horizon_s / slices`` of the oldest in-horizon outcomes may be
    dropped early (see :mod:`detectors.window`).
    """

    def __init__(self, *, horizon_s: float, max_samples: int = 100_000, slices: int = 60) -> None:
        self._w = RollingWindow(horizon_s=horizon_s, max_samples=max_samples, slices=slices)

    def __repr__(self) -> str:
        return f"RatioWindow(horizon_s={self._w.horizon_s:g}, max_samples={self._w.max_samples})"

    @property
    def horizon_s(self) -> float:
        return self._w.horizon_s

    def add(self, ok: bool, now: float) -> None:
        self._w.add(0.0 if ok else 1.0, now)

    def count(self, now: float) -> int:
        return self._w.count(now)

    def errors(self, now: float) -> int:
        """Outcomes in the window that were not ok."""
        self._w._at(now)
        return round(self._w._moments()[1])

    def ratio(self, now: float) -> float:
        """Error ratio in [0, 1]; NaN when empty."""
        return self._w.mean(now)

    def success_ratio(self, now: float) -> float:
        return 1.0 - self.ratio(now)

    def rate(self, now: float) -> float:
        """Outcomes per second over the horizon."""
        return self._w.rate(now)


def _check_horizons(horizons: Mapping[str, float] | None) -> dict[str, float]:
    if horizons is None:
        horizons = DEFAULT_HORIZONS
    if not isinstance(horizons, Mapping) or not horizons:
        raise DetectorConfigError(f"horizons must be a non-empty mapping of name -> seconds, got {horizons!r}")
    out = {}
    for name, seconds in horizons.items():
        check.name("horizon name", name)
        out[name] = check.real(f"horizon {name!r}", seconds, lo=0.0, lo_open=True)
    return out


class MultiWindow:
    """One stream of samples seen through several horizons, e.g. ``{"10s": 10, "1m": 60, "5m": 300}``.

    Each horizon is its own :class:`RollingWindow`, so a burst that overflows the 5-minute window
    leaves the 10-second one exact. ``max_samples`` applies per horizon.
    """

    def __init__(
        self,
        horizons: Mapping[str, float] | None = None,
        *,
        max_samples: int = 100_000,
        relative_accuracy: float = 0.01,
        slices: int = 60,
    ) -> None:
        self._windows = {
            name: RollingWindow(
                horizon_s=seconds,
                max_samples=max_samples,
                relative_accuracy=relative_accuracy,
                slices=slices,
            )
            for name, seconds in _check_horizons(horizons).items()
        }
        self._all = tuple(self._windows.values())

    def __repr__(self) -> str:
        spans = ", ".join(f"{k!r}: {w.horizon_s:g}" for k, w in self._windows.items())
        return f"MultiWindow({{{spans}}})"

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._windows)

    def __iter__(self) -> Iterator[str]:
        return iter(self._windows)

    def __len__(self) -> int:
        return len(self._windows)

    def window(self, name: str) -> RollingWindow:
        try:
            return self._windows[name]
        except KeyError:
            raise UnknownWindowError(f"no window named {name!r}; have {list(self._windows)}") from None

    def add(self, value: float, now: float) -> None:
        for w in self._all:
            w.add(value, now)

    def snapshot(self, name: str, now: float) -> WindowStats:
        return self.window(name).snapshot(now)

    def snapshots(self, now: float) -> dict[str, WindowStats]:
        return {name: w.snapshot(now) for name, w in self._windows.items()}

    def quantiles(self, name: str, qs: Sequence[float], now: float) -> list[float]:
        return self.window(name).quantiles(qs, now)

    def count(self, name: str, now: float) -> int:
        return self.window(name).count(now)

    def rate(self, name: str, now: float) -> float:
        return self.window(name).rate(now)


class MultiRatioWindow:
    """One stream of outcomes seen through several horizons (error ratios per horizon)."""

    def __init__(
        self, horizons: Mapping[str, float] | None = None, *, max_samples: int = 100_000, slices: int = 60
    ) -> None:
        self._windows = {
            name: RatioWindow(horizon_s=seconds, max_samples=max_samples, slices=slices)
            for name, seconds in _check_horizons(horizons).items()
        }
        self._all = tuple(self._windows.values())

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._windows)

    def window(self, name: str) -> RatioWindow:
        try:
            return self._windows[name]
        except KeyError:
            raise UnknownWindowError(f"no window named {name!r}; have {list(self._windows)}") from None

    def add(self, ok: bool, now: float) -> None:
        for w in self._all:
            w.add(ok, now)

    def ratio(self, name: str, now: float) -> float:
        return self.window(name).ratio(now)

    def count(self, name: str, now: float) -> int:
        return self.window(name).count(now)

    def errors(self, name: str, now: float) -> int:
        return self.window(name).errors(now)
