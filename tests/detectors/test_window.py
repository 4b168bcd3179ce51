"""Rolling windows: exact percentiles over the window, the overflow bound, bounded memory."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detectors import (
    DEFAULT_HORIZONS,
    DetectorConfigError,
    MultiRatioWindow,
    MultiWindow,
    RatioWindow,
    RollingWindow,
    UnknownWindowError,
    WindowStats,
)

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)
positive = st.floats(min_value=1e-6, max_value=1e6, allow_nan=False, allow_infinity=False)
qs_strategy = st.lists(st.floats(min_value=0.0, max_value=1.0), min_size=1, max_size=5)
# (time step since the previous event, value, query after this add?)
events_strategy = st.lists(
    st.tuples(st.floats(min_value=0.0, max_value=3.0), finite, st.booleans()), min_size=1, max_size=120
)


def in_window(events: list[tuple[float, float]], now: float, horizon: float) -> np.ndarray:
    cutoff = now - horizon
    return np.array([v for t, v in events if t > cutoff], dtype=float)


def within_rel(est: float, exact: float, alpha: float) -> bool:
    return abs(est - exact) <= alpha * abs(exact) * (1 + 1e-9) + 1e-12


# -- exact mode -----------------------------------------------------------------------------


@SETTINGS
@given(events=events_strategy, horizon=st.floats(min_value=0.5, max_value=20.0), qs=qs_strategy)
def test_exact_quantiles_equal_numpy_over_the_window(events, horizon, qs):
    w = RollingWindow(horizon_s=horizon)
    seen: list[tuple[float, float]] = []
    t = 1000.0
    for dt, value, query in events:
        t += dt
        w.add(value, t)
        seen.append((t, value))
        if not query:
            continue
        expected = in_window(seen, t, horizon)
        assert w.count(t) == expected.size
        assert w.rate(t) == pytest.approx(expected.size / horizon)
        assert w.exact(t) and w.error_bound(t) == 0.0
        got = w.quantiles(qs, t)
        if expected.size == 0:
            assert all(math.isnan(g) for g in got)
            continue
        np.testing.assert_allclose(got, np.quantile(expected, qs, method="linear"), rtol=1e-12, atol=1e-9)
        snap = w.snapshot(t)
        assert snap.count == expected.size and snap.exact
        assert snap.min == expected.min() and snap.max == expected.max()
        assert snap.mean == pytest.approx(expected.mean(), rel=1e-9, abs=1e-6)
        np.testing.assert_allclose(
            [snap.p50, snap.p95, snap.p99], np.quantile(expected, [0.5, 0.95, 0.99]), rtol=1e-12, atol=1e-9
        )


@SETTINGS
@given(
    values=st.lists(finite, min_size=1, max_size=60),
    horizon=st.floats(min_value=0.5, max_value=10.0),
    later=st.floats(min_value=0.0, max_value=30.0),
)
def test_samples_older_than_the_horizon_never_count(values, horizon, later):
    w = RollingWindow(horizon_s=horizon)
    for i, v in enumerate(values):
        w.add(v, i * 0.1)
    now = (len(values) - 1) * 0.1 + later
    # The window's definition, written the way it is computed: t > now - horizon.
    expected = [v for i, v in enumerate(values) if i * 0.1 > now - horizon]
    assert w.count(now) == len(expected)
    if expected:
        assert w.snapshot(now).max == max(expected)
    else:
        assert math.isnan(w.snapshot(now).max)


def test_a_sample_exactly_one_horizon_old_is_gone():
    w = RollingWindow(horizon_s=10.0)
    w.add(1.0, 0.0)
    assert w.count(9.999) == 1
    assert w.count(10.0) == 0


def test_empty_window_reads_nan_and_zero():
    w = RollingWindow(horizon_s=5.0)
    snap = w.snapshot(0.0)
    assert snap.count == 0 and snap.rate_per_s == 0.0 and snap.exact
    assert all(math.isnan(x) for x in (snap.mean, snap.min, snap.max, snap.p50, snap.p95, snap.p99))
    assert all(math.isnan(x) for x in w.quantiles([0.0, 0.5, 1.0], 0.0))
    assert math.isnan(w.mean(0.0))


def test_growth_and_wraparound_stay_exact():
    # Crosses the initial capacity, grows, then wraps the ring many times at a steady rate.
    rng = np.random.default_rng(7)
    w = RollingWindow(horizon_s=2.0, max_samples=5_000)
    values = rng.lognormal(size=20_000)
    times = np.arange(values.size) * 0.001
    for i, (v, t) in enumerate(zip(values.tolist(), times.tolist())):
        w.add(v, t)
        if i % 997 == 0:
            expected = values[: i + 1][times[: i + 1] > t - 2.0]
            np.testing.assert_allclose(w.quantiles([0.5, 0.99], t), np.quantile(expected, [0.5, 0.99]), rtol=1e-12)
    assert w.exact(float(times[-1]))


def test_non_finite_values_are_dropped_and_counted():
    w = RollingWindow(horizon_s=5.0)
    w.add(1.0, 0.0)
    w.add(math.nan, 0.1)
    w.add(math.inf, 0.2)
    w.add(2.0, math.nan)
    assert w.count(0.3) == 1
    assert w.rejected == 3


def test_time_never_runs_backwards():
    w = RollingWindow(horizon_s=10.0)
    w.add(1.0, 100.0)
    w.add(2.0, 50.0)  # read as 100.0
    assert w.count(105.0) == 2
    assert w.count(1.0) == 2  # an earlier query time is read as the latest
    assert w.count(110.0) == 0


def test_query_with_non_finite_now_raises():
    w = RollingWindow(horizon_s=1.0)
    with pytest.raises(DetectorConfigError):
        w.count(math.nan)


@pytest.mark.parametrize("q", [-0.01, 1.01, math.nan, "0.5", True])
def test_bad_quantile_raises(q):
    w = RollingWindow(horizon_s=1.0)
    with pytest.raises(ValueError):
        w.quantiles([q], 0.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"horizon_s": 0},
        {"horizon_s": -1},
        {"horizon_s": math.inf},
        {"horizon_s": math.nan},
        {"horizon_s": "10"},
        {"horizon_s": 10, "max_samples": 0},
        {"horizon_s": 10, "max_samples": 2.5},
        {"horizon_s": 10, "max_samples": True},
        {"horizon_s": 10, "relative_accuracy": 0.0},
        {"horizon_s": 10, "relative_accuracy": 0.5},
        {"horizon_s": 10, "slices": 1},
    ],
)
def test_constructor_validates(kwargs):
    with pytest.raises(DetectorConfigError) as info:
        RollingWindow(**kwargs)
    assert isinstance(info.value, ValueError)


def test_window_stats_is_frozen():
    snap = RollingWindow(horizon_s=1.0).snapshot(0.0)
    assert isinstance(snap, WindowStats)
    with pytest.raises(AttributeError):
        snap.count = 3  # type: ignore[misc]


# -- overflow mode --------------------------------------------------------------------------


@SETTINGS
@given(
    values=st.lists(positive, min_size=2, max_size=400),
    max_samples=st.integers(min_value=1, max_value=64),
    sign=st.sampled_from([1.0, -1.0]),
    qs=qs_strategy,
)
def test_overflow_quantiles_stay_within_the_stated_bound(values, max_samples, sign, qs):
    # No sample expires here, so the exact reference is simply every value added.
    w = RollingWindow(horizon_s=1e6, max_samples=max_samples, relative_accuracy=0.01)
    vals = np.array(values) * sign
    for i, v in enumerate(vals.tolist()):
        w.add(v, i * 0.01)
    now = len(values) * 0.01
    snap = w.snapshot(now)
    assert snap.count == vals.size
    assert snap.min == vals.min() and snap.max == vals.max()
    assert snap.mean == pytest.approx(vals.mean(), rel=1e-9)
    assert snap.error_bound == (0.01 if vals.size > max_samples else 0.0)
    for q, got in zip(qs, w.quantiles(qs, now)):
        assert within_rel(got, float(np.quantile(vals, q)), 0.01), (q, got)


@SETTINGS
@given(
    events=st.lists(
        st.tuples(st.floats(min_value=0.0, max_value=0.5), st.floats(min_value=0.0, max_value=100.0)),
        min_size=1,
        max_size=400,
    ),
    max_samples=st.integers(min_value=1, max_value=32),
    slices=st.integers(min_value=2, max_value=8),
    horizon=st.floats(min_value=1.0, max_value=10.0),
)
def test_overflow_never_counts_old_samples_and_drops_at_most_one_slice(events, max_samples, slices, horizon):
    w = RollingWindow(horizon_s=horizon, max_samples=max_samples, slices=slices)
    width = horizon / slices
    t = 0.0
    seen = []
    for dt, v in events:
        t += dt
        w.add(v, t)
        seen.append((t, v))
        snap = w.snapshot(t)
        inside = in_window(seen, t, horizon)
        newest = in_window(seen, t, horizon - width * (1 + 1e-9))
        assert newest.size <= snap.count <= inside.size
        if snap.count:
            assert inside.min() <= snap.min and snap.max <= inside.max()
            assert inside.min() - 1e-9 <= snap.mean <= inside.max() + 1e-9
            assert snap.rate_per_s >= snap.count / horizon * (1 - 1e-12)


def test_old_burst_stops_counting_in_overflow():
    w = RollingWindow(horizon_s=10.0, max_samples=50, slices=10)
    for i in range(1_000):  # a burst of large values in the first 5 s
        w.add(1000.0, i * 0.005)
    rng = np.random.default_rng(3)
    for i in range(2_500):  # then 100/s of small ones
        w.add(float(rng.uniform(1.0, 2.0)), 5.0 + i * 0.01)
        now = 5.0 + i * 0.01
        if now > 15.0:
            snap = w.snapshot(now)
            assert snap.max < 1000.0
            assert all(q < 2.1 for q in w.quantiles([0.5, 0.99, 1.0], now))


def test_exact_again_once_the_overflow_ages_out():
    w = RollingWindow(horizon_s=10.0, max_samples=100)
    for i in range(1_000):
        w.add(float(i), i * 0.001)
    assert not w.exact(1.0)
    for i in range(50):
        w.add(float(i), 20.0 + i * 0.1)
    assert w.exact(25.0)
    assert w.quantiles([0.5], 25.0) == [pytest.approx(np.quantile(np.arange(50.0), 0.5))]


def test_memory_stays_bounded_over_a_million_samples():
    # 10k samples/s into a 60 s horizon holds 600k samples, far past max_samples.
    n = 1_000_000
    rng = np.random.default_rng(11)
    values = rng.lognormal(mean=-3.0, sigma=0.5, size=n)
    times = np.arange(n) * 1e-4
    w = RollingWindow(horizon_s=60.0, max_samples=2_000)
    sizes = {}
    vals, ts = values.tolist(), times.tolist()
    for i in range(n):
        w.add(vals[i], ts[i])
        if i + 1 in (700_000, n):  # both after the first full horizon (600k samples)
            sizes[i + 1] = len(pickle.dumps(w))
    assert sizes[n] <= sizes[700_000] * 1.25
    assert sizes[n] < 2_000_000
    now = ts[-1]
    snap = w.snapshot(now)
    assert snap.error_bound == 0.01
    expected = values[times > now - 60.0]
    assert expected.size * (1 - 1 / 60) <= snap.count <= expected.size
    # The sketch bound plus the sliver of the window dropped early.
    for got, want in zip((snap.p50, snap.p95, snap.p99), np.quantile(expected, [0.5, 0.95, 0.99])):
        assert abs(got - want) <= 0.015 * want
    assert snap.rate_per_s == pytest.approx(10_000.0, rel=0.01)


# -- ratio and multi-horizon windows --------------------------------------------------------


@SETTINGS
@given(
    events=st.lists(st.tuples(st.floats(min_value=0.0, max_value=2.0), st.booleans()), min_size=1, max_size=100),
    horizon=st.floats(min_value=0.5, max_value=10.0),
)
def test_ratio_window_is_the_error_fraction_over_the_window(events, horizon):
    w = RatioWindow(horizon_s=horizon)
    seen = []
    t = 0.0
    for dt, ok in events:
        t += dt
        w.add(ok, t)
        seen.append((t, ok))
        inside = [o for ts, o in seen if ts > t - horizon]
        assert w.count(t) == len(inside)
        assert w.errors(t) == inside.count(False)
        if inside:
            assert w.ratio(t) == pytest.approx(inside.count(False) / len(inside))
            assert w.success_ratio(t) == pytest.approx(inside.count(True) / len(inside))
        else:
            assert math.isnan(w.ratio(t))


def test_ratio_window_stays_exact_in_count_when_overflowing():
    w = RatioWindow(horizon_s=1e6, max_samples=16)
    for i in range(1_000):
        w.add(i % 4 != 0, float(i))
    assert w.count(1_000.0) == 1_000
    assert w.errors(1_000.0) == 250
    assert w.ratio(1_000.0) == pytest.approx(0.25)


def test_multi_window_views_one_stream_through_each_horizon():
    mw = MultiWindow({"10s": 10, "1m": 60, "5m": 300})
    singles = {name: RollingWindow(horizon_s=h) for name, h in {"10s": 10, "1m": 60, "5m": 300}.items()}
    rng = np.random.default_rng(5)
    times = []
    for i in range(3_000):
        v, t = float(rng.exponential()), i * 0.2
        times.append(t)
        mw.add(v, t)
        for w in singles.values():
            w.add(v, t)
    assert mw.names == ("10s", "1m", "5m")
    now = 600.0
    for name, w in singles.items():
        assert mw.snapshot(name, now) == w.snapshot(now)
        assert mw.count(name, now) == w.count(now)
        assert mw.rate(name, now) == w.rate(now)
        assert mw.quantiles(name, [0.9], now) == w.quantiles([0.9], now)
    snaps = mw.snapshots(now)
    assert list(snaps) == ["10s", "1m", "5m"]
    for name, horizon in (("10s", 10), ("1m", 60), ("5m", 300)):
        assert snaps[name].count == sum(1 for t in times if t > now - horizon)
    assert snaps["10s"].count < snaps["1m"].count < snaps["5m"].count


def test_multi_window_defaults_and_errors():
    assert MultiWindow().names == tuple(DEFAULT_HORIZONS)
    mw = MultiWindow({"a": 1.0})
    with pytest.raises(UnknownWindowError) as info:
        mw.snapshot("b", 0.0)
    assert isinstance(info.value, KeyError)
    for bad in ({}, {"": 1.0}, {"x": 0}, {"x": -5}, {"x": "5"}, [("x", 5)]):
        with pytest.raises(DetectorConfigError):
            MultiWindow(bad)  # type: ignore[arg-type]


def test_multi_ratio_window():
    mw = MultiRatioWindow({"short": 1.0, "long": 100.0})
    for i in range(100):
        mw.add(i >= 95, float(i))  # the last five are ok, the rest errors
    assert mw.ratio("short", 99.0) == 0.0
    assert mw.errors("long", 99.0) == 95
    assert mw.count("long", 99.0) == 100
    with pytest.raises(UnknownWindowError):
        mw.ratio("nope", 99.0)
