"""The performance monitor: rolling-window statistics per (model, operation), and resource utilisation.

A pure, synchronous object: every method takes ``now`` (seconds on a monotonic clock), nothing does I/O, and
one owner (the sidecar's event loop) calls it. The windows are :mod:`detectors.window`'s, so percentiles are
exact (numpy's ``linear`` definition) while a window holds at most ``max_samples`` samples, and within the
reported ``error_bound`` (relative, 1%) beyond that.

Sampled traces. A sample's ``weight`` is its span's adjusted count (1/p of its ``ot=th:`` threshold, 1 without
one). Once a series has seen a weight other than 1 it also keeps its samples with their weights (the newest
``max_samples``), and its statistics become the adjusted ones: request and error counts, throughput, mean and
tokens per second are sums of weights (exact, the samples of weight 1 from before included), percentiles and SLO
attainment are weighted over the samples kept since the first weight. ``sampled`` and ``effective_samples`` say
how many spans a figure rests on (``effective_samples = (sum w)^2 / sum w^2``); a weighted quantile's rank is off
by about ``sqrt(q (1 - q) / effective_samples)`` (one standard error), reported as ``sampling_rank_error`` at the
median, the widest.

Samples are timestamped when the sidecar receives them, not with the span's own end time: exporters batch
spans for seconds, and the sidecar's clock is the only one every sample agrees on.

Why one module of about 530 lines: the weighted and unweighted statistics, the per-series cache and the SLO
attainment read the same samples under the same invariant (a figure changes only when its window does); the
windows themselves are already apart (``detectors.window``).
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from detectors.window import MultiRatioWindow, MultiWindow, WindowStats

from sidecar.otlp import INFERENCE, REQUEST, SCOPES, SpanSample

_RESOURCE_MAX_SAMPLES = 10_000


@dataclass(frozen=True, slots=True)
class SeriesKey:
    """One tracked series: requests (or inferences) of one model and operation."""

    scope: str
    model: str
    operation: str


def _num(x: float) -> float | None:
    """JSON has no NaN: empty statistics become null."""
    return None if x is None or math.isnan(x) else x


def _dist(s: WindowStats) -> dict[str, float | None]:
    return {"mean": _num(s.mean), "min": _num(s.min), "max": _num(s.max), "p50": _num(s.p50), "p95": _num(s.p95), "p99": _num(s.p99)}


@dataclass(frozen=True, slots=True)
class SeriesStats:
    """Statistics of one series over one window at one instant (NaN where the window is empty)."""

    key: SeriesKey
    window: str
    window_s: float
    latency: WindowStats
    error_ratio: float
    errors: int
    ttft: WindowStats | None
    input_tokens_per_s: float
    output_tokens_per_s: float
    requests_total: int
    errors_total: int
    latency_sum_total: float = 0.0
    ttft_count_total: int = 0
    ttft_sum_total: float = 0.0
    sampled: int | None = None
    effective_samples: float | None = None

    @property
    def requests(self) -> int:
        return self.latency.count

    @property
    def throughput_rps(self) -> float:
        return self.latency.rate_per_s

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.key.model,
            "operation": self.key.operation,
            "scope": self.key.scope,
            "window": self.window,
            "window_s": self.window_s,
            "requests": self.requests,
            "throughput_rps": self.throughput_rps,
            "errors": self.errors,
            "error_ratio": _num(self.error_ratio),
            "latency_s": _dist(self.latency),
            "ttft_s": None if self.ttft is None else _dist(self.ttft),
            "input_tokens_per_s": self.input_tokens_per_s,
            "output_tokens_per_s": self.output_tokens_per_s,
            "error_bound": self.latency.error_bound,
            "totals": {"requests": self.requests_total, "errors": self.errors_total},
            "sampling": self._sampling_json(),
        }

    def _sampling_json(self) -> dict[str, Any] | None:
        """How many spans the figures rest on, and the rank error of a weighted quantile; None when unweighted."""
        if self.sampled is None:
            return None
        eff = self.effective_samples or 0.0
        return {
            "spans": self.sampled,
            "effective_samples": eff,
            "rank_error": math.sqrt(0.25 / eff) if eff > 0 else None,
        }


class _Series:
    __slots__ = ("latency", "errors", "ttft", "input_tokens", "output_tokens", "requests_total", "errors_total",
                 "latency_sum", "ttft_count", "ttft_sum", "first_seen", "last_seen", "fresh", "slo", "weighted")

    def __init__(self, windows: Mapping[str, float], max_samples: int) -> None:
        self.latency = MultiWindow(windows, max_samples=max_samples)
        self.errors = MultiRatioWindow(windows, max_samples=max_samples)
        # Only spans that carry them feed these; created on first use.
        self.ttft: MultiWindow | None = None
        self.input_tokens: MultiWindow | None = None
        self.output_tokens: MultiWindow | None = None
        self.requests_total = 0.0  # sums of weights (adjusted counts); whole numbers while unsampled
        self.errors_total = 0.0
        self.latency_sum = 0.0
        self.ttft_count = 0
        self.ttft_sum = 0.0
        self.first_seen = math.inf
        self.last_seen = -math.inf
        # Latencies since the last take_fresh(); kept only once someone has asked for them.
        self.fresh: deque[float] | None = None
        # (threshold, met-or-not window) once someone tracks an objective for this series' model.
        self.slo: tuple[float, MultiRatioWindow] | None = None
        # Samples with their weights, from the first sample whose weight is not 1 on.
        self.weighted: _Weighted | None = None


@dataclass(frozen=True, slots=True)
class _Summary:
    n: int
    weight: float
    weight_sq: float
    extra: float
    extra_latency: float
    extra_errors: float
    extra_input_tokens: float
    extra_output_tokens: float
    quantiles: tuple[float, ...]


class _Weighted:
    """A series' samples with their weights (the newest ``max_samples``), in arrival order.

    Parallel lists with a moving head: appends are O(1), a window is found by bisecting the times, and the
    head is compacted once half the lists are behind it.
    """

    __slots__ = ("t", "value", "weight", "ok", "input_tokens", "output_tokens", "head", "max_samples", "base",
                 "quantiles")

    def __init__(self, max_samples: int) -> None:
        self.t: list[float] = []
        self.value: list[float] = []
        self.weight: list[float] = []
        self.ok: list[bool] = []
        self.input_tokens: list[float] = []
        self.output_tokens: list[float] = []
        self.head = 0
        self.max_samples = max_samples
        self.base = 0  # samples compacted away, so (base + index) names a sample for good
        # window horizon -> ((first, end) absolute indices, summary): the sums and the sort are redone only when
        # the window's samples changed, not on every query of the same state.
        self.quantiles: dict[float, tuple[tuple[int, int], _Summary]] = {}

    def add(self, sample: SpanSample, now: float) -> None:
        if self.t and now < self.t[-1]:
            now = self.t[-1]  # keep the times sorted for bisect whatever the clock does
        self.t.append(now)
        self.value.append(sample.duration_s)
        self.weight.append(sample.weight)
        self.ok.append(not sample.error)
        self.input_tokens.append(math.nan if sample.input_tokens is None else float(sample.input_tokens))
        self.output_tokens.append(math.nan if sample.output_tokens is None else float(sample.output_tokens))
        if len(self.t) - self.head > self.max_samples:
            self.head += 1
        if self.head > 1024 and self.head * 2 > len(self.t):
            for name in ("t", "value", "weight", "ok", "input_tokens", "output_tokens"):
                setattr(self, name, getattr(self, name)[self.head:])
            self.base += self.head
            self.head = 0

    def summary(self, horizon: float, start: int) -> _Summary:
        """The weighted sums and quantiles of the samples from ``start`` on, recomputed only when they changed."""
        key = (self.base + start, self.base + len(self.t))
        cached = self.quantiles.get(horizon)
        if cached is not None and cached[0] == key:
            return cached[1]
        values = np.asarray(self.value[start:], dtype=float)
        weights = np.asarray(self.weight[start:], dtype=float)
        failed = ~np.asarray(self.ok[start:], dtype=bool)
        extra = weights - 1.0
        summary = _Summary(
            n=int(values.size),
            weight=float(weights.sum()),
            weight_sq=float((weights * weights).sum()),
            extra=float(extra.sum()),
            extra_latency=float((extra * values).sum()),
            extra_errors=float(extra[failed].sum()),
            extra_input_tokens=float(np.nansum(np.asarray(self.input_tokens[start:], dtype=float) * extra)),
            extra_output_tokens=float(np.nansum(np.asarray(self.output_tokens[start:], dtype=float) * extra)),
            quantiles=tuple(weighted_quantiles(values, weights, (0.5, 0.95, 0.99))),
        )
        self.quantiles[horizon] = (key, summary)
        return summary

    def since(self, cutoff: float) -> int:
        """Index of the first sample younger than ``cutoff`` (a window counts ``t > now - horizon``)."""
        return max(self.head, bisect.bisect_right(self.t, cutoff))

    def arrays(self, start: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return (np.asarray(self.value[start:], dtype=float), np.asarray(self.weight[start:], dtype=float),
                np.asarray(self.ok[start:], dtype=bool))


def weighted_quantiles(values: np.ndarray, weights: np.ndarray, qs: Iterable[float]) -> list[float]:
    """Quantiles of samples that each stand for ``weight`` requests (adjusted counts, so weights >= 1).

    numpy's ``linear`` definition over the requests the samples stand for: a sample of weight ``w`` is ``w``
    equal values, so an integer weight gives exactly ``np.quantile(np.repeat(values, weights), q)`` and weights of
    1 the plain ``np.quantile(values, q)``. Each sorted value holds from its first rank ``S_i - w_i`` to its
    last ``S_i - 1`` (``S_i`` the weight up to and including it) and the quantile at rank ``q (W - 1)`` is
    interpolated between neighbours, as for repeated values.
    """
    qs = list(qs)
    if values.size == 0:
        return [math.nan for _ in qs]
    order = np.argsort(values, kind="stable")
    v, w = values[order], np.maximum(weights[order], 1.0)
    upto = np.cumsum(w)
    first = upto - w
    last = np.maximum(first, upto - 1.0)
    ranks = np.column_stack((first, last)).ravel()
    knots = np.repeat(v, 2)
    top = upto[-1] - 1.0
    return [float(np.interp(q * top, ranks, knots)) for q in qs]


def _sum_rate(window: MultiWindow | None, name: str, now: float) -> float:
    """Sum of the window's values per second of its horizon (tokens per second)."""
    if window is None:
        return 0.0
    s = window.snapshot(name, now)
    return 0.0 if s.count == 0 else s.mean * s.rate_per_s


class PerformanceMonitor:
    """Rolling statistics per :class:`SeriesKey` over every configured window, plus resource windows.

    Args:
        windows: window name -> horizon in seconds (e.g. ``{"10s": 10, "1m": 60, "5m": 300}``).
        max_samples: raw samples one window of one series keeps (memory bound; past it percentiles carry
            the stated error bound).
        max_series: most series tracked; samples of further series are counted in :attr:`untracked`, except
            that a series idle for longer than the longest window is evicted to make room.
    """

    def __init__(self, *, windows: Mapping[str, float], max_samples: int = 100_000, max_series: int = 256) -> None:
        if not windows:
            raise ValueError("PerformanceMonitor needs at least one window")
        self.windows: dict[str, float] = dict(windows)
        self.max_samples = max_samples
        self.max_series = max_series
        self._longest = max(self.windows.values())
        self._series: dict[SeriesKey, _Series] = {}
        self._resources: dict[tuple[str, str], MultiWindow] = {}
        self._slo: dict[str, float] = {}
        self.untracked = 0
        self.samples = 0

    # -- ingestion -----------------------------------------------------------------------------------------

    def record(self, sample: SpanSample, now: float) -> bool:
        """Add one request/inference sample; ``False`` when the series cap refused it."""
        key = SeriesKey(sample.scope, sample.model, sample.operation)
        series = self._series.get(key)
        if series is None:
            series = self._new_series(key, now)
            if series is None:
                self.untracked += 1
                return False
        series.latency.add(sample.duration_s, now)
        weight = sample.weight
        if series.weighted is None and weight != 1.0:
            series.weighted = _Weighted(self.max_samples)
        if series.weighted is not None:
            series.weighted.add(sample, now)
        if series.fresh is not None:
            series.fresh.append(sample.duration_s)
        series.errors.add(not sample.error, now)
        if sample.scope == REQUEST and sample.model in self._slo:
            self._slo_window(series, self._slo[sample.model]).add(
                not sample.error and sample.duration_s <= self._slo[sample.model], now
            )
        series.requests_total += weight
        series.latency_sum += sample.duration_s * weight
        if sample.error:
            series.errors_total += weight
        series.last_seen = now
        if sample.ttft_s is not None:
            if series.ttft is None:
                series.ttft = MultiWindow(self.windows, max_samples=self.max_samples)
            series.ttft.add(sample.ttft_s, now)
            series.ttft_count += 1
            series.ttft_sum += sample.ttft_s
        if sample.input_tokens is not None:
            if series.input_tokens is None:
                series.input_tokens = MultiWindow(self.windows, max_samples=self.max_samples)
            series.input_tokens.add(sample.input_tokens, now)
        if sample.output_tokens is not None:
            if series.output_tokens is None:
                series.output_tokens = MultiWindow(self.windows, max_samples=self.max_samples)
            series.output_tokens.add(sample.output_tokens, now)
        self.samples += 1
        return True

    def record_many(self, samples: Iterable[SpanSample], now: float) -> int:
        """Add a batch received at ``now``; returns how many were tracked."""
        return sum(self.record(s, now) for s in samples)

    def _new_series(self, key: SeriesKey, now: float) -> _Series | None:
        if len(self._series) >= self.max_series:
            idle = [k for k, s in self._series.items() if now - s.last_seen > self._longest]
            if not idle:
                return None
            oldest = min(idle, key=lambda k: self._series[k].last_seen)
            del self._series[oldest]
        series = _Series(self.windows, self.max_samples)
        series.first_seen = now
        self._series[key] = series
        return series

    def record_resource(self, name: str, instance: str, value: float | None, now: float) -> None:
        """Add a resource reading (e.g. ``("gpu_utilization_ratio", "0")``); ``None`` is skipped."""
        if value is None:
            return
        window = self._resources.get((name, instance))
        if window is None:
            window = MultiWindow(self.windows, max_samples=min(self.max_samples, _RESOURCE_MAX_SAMPLES))
            self._resources[(name, instance)] = window
        window.add(value, now)

    def track_slo(self, model: str, threshold_s: float) -> None:
        """Count, from now on, which requests of ``model`` finish within ``threshold_s`` (and without error)."""
        if threshold_s <= 0:
            raise ValueError(f"threshold_s must be positive, got {threshold_s}")
        self._slo[model] = threshold_s

    def _slo_window(self, series: _Series, threshold: float) -> MultiRatioWindow:
        if series.slo is None or series.slo[0] != threshold:
            series.slo = (threshold, MultiRatioWindow(self.windows, max_samples=self.max_samples))
        return series.slo[1]

    def slo_attainment(self, key: SeriesKey, window: str, now: float) -> float:
        """Share of the window's requests that met the tracked objective; NaN when untracked or empty."""
        series = self._series.get(key)
        if series is None or series.slo is None or series.slo[0] != self._slo.get(key.model):
            return math.nan
        ratios = series.slo[1]
        if ratios.count(window, now) == 0:
            return math.nan
        if series.weighted is not None:
            store = series.weighted
            values, weights, ok = store.arrays(store.since(now - self.windows[window]))
            total = float(weights.sum())
            if total > 0:
                return float(weights[ok & (values <= series.slo[0])].sum()) / total
        return 1.0 - ratios.ratio(window, now)

    # -- queries -------------------------------------------------------------------------------------------

    def keys(self, *, scope: str | None = None) -> list[SeriesKey]:
        """Tracked series, sorted."""
        keys = [k for k in self._series if scope is None or k.scope == scope]
        return sorted(keys, key=lambda k: (k.scope, k.model, k.operation))

    def first_seen(self, key: SeriesKey) -> float:
        """When the series got its first sample (``now`` units); KeyError for an unknown series."""
        return self._series[key].first_seen

    def latency_and_errors(self, key: SeriesKey, window: str, now: float) -> tuple[WindowStats, float]:
        """The two inputs the detectors read each tick: the latency window and the error ratio; for a sampled
        series the adjusted ones (counts summed by weight, percentiles weighted), the figures the query API shows,
        so that a rule fires on the traffic the spans stand for rather than on the spans that happened to be kept."""
        series = self._series[key]
        if series.weighted is None:
            return series.latency.snapshot(window, now), series.errors.ratio(window, now)
        stats = self.series_stats(key, window, now)
        return stats.latency, stats.error_ratio

    def fresh_count(self, key: SeriesKey) -> int:
        """Latency samples of ``key`` recorded since the last :meth:`take_fresh` (0 before the first)."""
        fresh = self._series[key].fresh
        return 0 if fresh is None else len(fresh)

    def take_fresh(self, key: SeriesKey) -> np.ndarray:
        """Latency samples of ``key`` recorded since the previous call, emptied (the newest ``max_samples``).

        The first call only starts the collection (and returns nothing), so series nobody asks about cost nothing.
        Consecutive calls see disjoint samples: the statistical detectors' non-overlapping points.
        """
        series = self._series[key]
        fresh = series.fresh
        series.fresh = deque(maxlen=self.max_samples)
        return np.fromiter(() if fresh is None else fresh, dtype=float)

    def series_stats(self, key: SeriesKey, window: str, now: float) -> SeriesStats:
        """Statistics of one series over one window (KeyError for an unknown series or window)."""
        series = self._series[key]
        if window not in self.windows:
            raise KeyError(window)
        latency = series.latency.snapshot(window, now)
        errors = series.errors.window(window)
        stats = SeriesStats(
            key=key,
            window=window,
            window_s=self.windows[window],
            latency=latency,
            error_ratio=errors.ratio(now),
            errors=errors.errors(now),
            ttft=None if series.ttft is None else series.ttft.snapshot(window, now),
            input_tokens_per_s=_sum_rate(series.input_tokens, window, now),
            output_tokens_per_s=_sum_rate(series.output_tokens, window, now),
            requests_total=int(round(series.requests_total)),
            errors_total=int(round(series.errors_total)),
            latency_sum_total=series.latency_sum,
            ttft_count_total=series.ttft_count,
            ttft_sum_total=series.ttft_sum,
        )
        if series.weighted is not None:
            stats = self._adjusted(stats, series.weighted, now)
        return stats

    def _adjusted(self, stats: SeriesStats, store: _Weighted, now: float) -> SeriesStats:
        """``stats`` with counts, rates and the mean summed by weight and the percentiles weighted.

        The unweighted window already counts every sample once; adding ``w - 1`` per kept sample makes the
        sums exact, samples of weight 1 from before the store began included.
        """
        lat = stats.latency
        summary = store.summary(stats.window_s, store.since(now - stats.window_s))
        count = lat.count + summary.extra
        if lat.count == 0 or count <= 0:
            return stats
        span = lat.count / lat.rate_per_s if lat.rate_per_s > 0 else stats.window_s
        total = lat.mean * lat.count + summary.extra_latency
        p50, p95, p99 = summary.quantiles if summary.n else (lat.p50, lat.p95, lat.p99)
        errors = stats.errors + summary.extra_errors
        tokens = {
            "input_tokens_per_s": stats.input_tokens_per_s + summary.extra_input_tokens / span,
            "output_tokens_per_s": stats.output_tokens_per_s + summary.extra_output_tokens / span,
        }
        return dataclasses.replace(
            stats,
            latency=WindowStats(
                count=int(round(count)), rate_per_s=count / span, mean=total / count, min=lat.min, max=lat.max,
                p50=p50, p95=p95, p99=p99, error_bound=lat.error_bound,
            ),
            errors=int(round(errors)),
            error_ratio=errors / count,
            sampled=summary.n,
            effective_samples=summary.weight * summary.weight / summary.weight_sq if summary.n else 0.0,
            **tokens,
        )

    def stats(
        self,
        now: float,
        *,
        model: str | None = None,
        operation: str | None = None,
        window: str | None = None,
        scope: str | None = REQUEST,
    ) -> list[SeriesStats]:
        """Statistics of every series matching the filters, over one window or all of them.

        ``scope=None`` returns request and inference series alike. An unknown window is a KeyError.
        """
        if window is not None and window not in self.windows:
            raise KeyError(window)
        if scope is not None and scope not in SCOPES:
            raise KeyError(scope)
        names = [window] if window is not None else list(self.windows)
        out = []
        for key in self.keys(scope=scope):
            if (model is not None and key.model != model) or (operation is not None and key.operation != operation):
                continue
            for name in names:
                out.append(self.series_stats(key, name, now))
        return out

    def totals(self) -> list[tuple[SeriesKey, int, int]]:
        """(key, requests_total, errors_total) of every series: monotonic counters since start."""
        return [(k, int(round(s.requests_total)), int(round(s.errors_total))) for k, s in self._series.items()]

    def resource_names(self) -> list[tuple[str, str]]:
        return sorted(self._resources)

    def resource_stats(self, name: str, instance: str, now: float) -> dict[str, dict[str, float | None]]:
        """Window name -> {mean, max, p95, samples} of one resource reading; ``{}`` when never recorded."""
        window = self._resources.get((name, instance))
        if window is None:
            return {}
        out = {}
        for w in self.windows:
            s = window.snapshot(w, now)
            out[w] = {"mean": _num(s.mean), "max": _num(s.max), "p95": _num(s.p95), "samples": s.count}
        return out

    @property
    def series_count(self) -> int:
        return len(self._series)


__all__ = ["INFERENCE", "REQUEST", "PerformanceMonitor", "SeriesKey", "SeriesStats", "weighted_quantiles"]
