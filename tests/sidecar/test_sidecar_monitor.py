"""The performance monitor: windowed statistics per (model, operation) equal numpy's over the same samples."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.monitor import PerformanceMonitor, SeriesKey
from sidecar.otlp import INFERENCE, REQUEST, SpanSample

WINDOWS = {"10s": 10.0, "1m": 60.0}


def sample(d, *, model="m", op="chat", error=False, scope=REQUEST, **kw):
    return SpanSample(scope, model, op, d, error, **kw)


def test_percentiles_throughput_and_errors_equal_numpy():
    rng = np.random.default_rng(7)
    values = rng.lognormal(-2, 0.8, size=1000)
    mon = PerformanceMonitor(windows=WINDOWS)
    for i, v in enumerate(values):
        mon.record(sample(float(v), error=i % 10 == 0, input_tokens=3, output_tokens=5), now=100.0 + i * 0.005)
    (s,) = mon.stats(105.0, window="1m")
    p50, p95, p99 = np.quantile(values, [0.5, 0.95, 0.99])
    assert (s.latency.p50, s.latency.p95, s.latency.p99) == (p50, p95, p99)
    assert s.latency.mean == pytest.approx(values.mean())
    assert s.requests == 1000 and s.latency.error_bound == 0.0
    assert s.throughput_rps == pytest.approx(1000 / 60)
    assert s.errors == 100 and s.error_ratio == pytest.approx(0.1)
    assert s.input_tokens_per_s == pytest.approx(3000 / 60) and s.output_tokens_per_s == pytest.approx(5000 / 60)
    body = s.to_json()
    assert body["latency_s"]["p99"] == p99 and body["totals"] == {"requests": 1000, "errors": 100}


def test_old_samples_leave_short_windows_first():
    mon = PerformanceMonitor(windows=WINDOWS)
    mon.record(sample(9.0), now=0.0)
    mon.record(sample(1.0), now=20.0)
    short, long = mon.stats(25.0, window="10s")[0], mon.stats(25.0, window="1m")[0]
    assert (short.requests, short.latency.max) == (1, 1.0)
    assert (long.requests, long.latency.max) == (2, 9.0)
    empty = mon.stats(200.0, window="1m")[0]
    assert empty.requests == 0 and empty.to_json()["latency_s"]["p50"] is None and empty.to_json()["error_ratio"] is None


def test_filters_scopes_and_unknown_window():
    mon = PerformanceMonitor(windows=WINDOWS)
    mon.record(sample(1.0, model="a"), 0.0)
    mon.record(sample(1.0, model="b", op="embeddings"), 0.0)
    mon.record(sample(0.5, model="a", scope=INFERENCE), 0.0)
    assert {s.key.model for s in mon.stats(1.0)} == {"a", "b"}
    assert len(mon.stats(1.0)) == 4  # two series x two windows
    assert [s.key for s in mon.stats(1.0, operation="embeddings", window="10s")] == [SeriesKey(REQUEST, "b", "embeddings")]
    assert [s.key.scope for s in mon.stats(1.0, scope=INFERENCE, window="10s")] == [INFERENCE]
    assert len(mon.stats(1.0, scope=None, window="10s")) == 3
    with pytest.raises(KeyError):
        mon.stats(1.0, window="1h")


def test_series_cap_counts_and_evicts_idle_series():
    mon = PerformanceMonitor(windows=WINDOWS, max_series=2)
    assert mon.record(sample(1.0, model="a"), 0.0) and mon.record(sample(1.0, model="b"), 0.0)
    assert not mon.record(sample(1.0, model="c"), 1.0)
    assert mon.untracked == 1
    mon.record(sample(1.0, model="b"), 50.0)
    assert mon.record(sample(1.0, model="c"), 70.0)  # "a" idle past the longest window: evicted
    assert {k.model for k in mon.keys()} == {"b", "c"}


def test_resource_windows():
    mon = PerformanceMonitor(windows=WINDOWS)
    for i, v in enumerate([10.0, 20.0, 90.0]):
        mon.record_resource("host_cpu_percent", "", v, now=float(i))
    mon.record_resource("host_cpu_percent", "", None, now=3.0)
    stats = mon.resource_stats("host_cpu_percent", "", now=3.0)
    assert stats["1m"]["mean"] == pytest.approx(40.0) and stats["1m"]["max"] == 90.0 and stats["1m"]["samples"] == 3
    assert mon.resource_stats("nope", "", 3.0) == {}


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(0, 30, allow_nan=False), st.floats(1e-4, 100, allow_nan=False), st.booleans()),
        min_size=1,
        max_size=200,
    )
)
def test_window_statistics_are_exact_over_exactly_the_samples_inside_it(events):
    """Whatever the arrival pattern, the 10 s stats equal numpy over the samples younger than 10 s."""
    events.sort(key=lambda e: e[0])
    mon = PerformanceMonitor(windows=WINDOWS)
    for t, v, err in events:
        mon.record(sample(v, error=err), now=t)
    now = events[-1][0] + 0.5
    inside = [(v, err) for t, v, err in events if now - t < 10.0]
    (s,) = mon.stats(now, window="10s")
    assert s.requests == len(inside)
    if inside:
        vals = np.array([v for v, _ in inside])
        assert [s.latency.p50, s.latency.p95, s.latency.p99] == pytest.approx(list(np.quantile(vals, [0.5, 0.95, 0.99])), rel=1e-12)
        assert s.errors == sum(err for _, err in inside)


def test_memory_stays_bounded_past_max_samples():
    mon = PerformanceMonitor(windows={"1m": 60.0}, max_samples=256)
    values = np.random.default_rng(3).exponential(0.2, size=20_000)
    for i, v in enumerate(values):
        mon.record(sample(float(v)), now=i * 0.001)
    (s,) = mon.stats(20.0)
    assert s.requests == 20_000  # still counted exactly
    assert s.latency.error_bound > 0  # percentiles now carry the stated bound
    assert abs(s.latency.p95 / np.quantile(values, 0.95) - 1) <= s.latency.error_bound * 1.5
