"""Threshold rules: the for-duration state machine, runtime changes, missing data, the four rules."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from detectors import (
    DetectorConfigError,
    RatioWindow,
    RollingWindow,
    RuleState,
    ThresholdRule,
    error_rate_above,
    latency_above,
    memory_percent_above,
    throughput_below,
)

INACTIVE, PENDING, FIRING = RuleState.INACTIVE, RuleState.PENDING, RuleState.FIRING


def test_one_spike_does_not_fire_a_rule_with_a_for_duration():
    rule = ThresholdRule(name="lat", threshold=0.5, for_s=30.0)
    assert rule.evaluate(0.1, 0.0) is INACTIVE
    assert rule.evaluate(2.0, 10.0) is PENDING
    assert rule.active_since == 10.0
    assert rule.evaluate(0.1, 20.0) is INACTIVE
    assert rule.active_since is None


def test_fires_once_the_condition_held_for_the_duration():
    rule = ThresholdRule(name="lat", threshold=0.5, for_s=30.0)
    states = [rule.evaluate(1.0, t) for t in (0.0, 10.0, 20.0, 29.9, 30.0, 45.0)]
    assert states == [PENDING, PENDING, PENDING, PENDING, FIRING, FIRING]
    assert rule.active_since == 0.0 and rule.firing_since == 30.0
    assert rule.last_value == 1.0 and rule.last_evaluated == 45.0
    assert rule.evaluate(0.4, 50.0) is INACTIVE
    assert rule.firing_since is None


def test_zero_for_fires_on_the_first_breach():
    rule = ThresholdRule(name="mem", threshold=90.0)
    assert rule.evaluate(95.0, 0.0) is FIRING


def test_comparison_is_strict_and_direction_follows_above():
    above = ThresholdRule(name="a", threshold=1.0)
    below = ThresholdRule(name="b", threshold=1.0, above=False)
    assert above.evaluate(1.0, 0.0) is INACTIVE and below.evaluate(1.0, 0.0) is INACTIVE
    assert above.evaluate(1.1, 1.0) is FIRING and below.evaluate(1.1, 1.0) is INACTIVE
    assert below.evaluate(0.9, 2.0) is FIRING


def test_threshold_and_for_can_change_at_runtime():
    rule = ThresholdRule(name="lat", threshold=0.5, for_s=10.0)
    rule.evaluate(0.7, 0.0)
    rule.threshold = 1.0
    assert rule.evaluate(0.7, 5.0) is INACTIVE
    rule.threshold = 0.6
    rule.for_s = 0.0
    assert rule.evaluate(0.7, 6.0) is FIRING
    for bad in (math.nan, math.inf, "1", None, True):
        with pytest.raises(DetectorConfigError):
            rule.threshold = bad  # type: ignore[assignment]
    with pytest.raises(DetectorConfigError):
        rule.for_s = -1.0
    assert rule.threshold == 0.6 and rule.for_s == 0.0


def test_keep_firing_for_stops_flapping():
    rule = ThresholdRule(name="lat", threshold=0.5, for_s=0.0, keep_firing_for_s=20.0)
    assert rule.evaluate(1.0, 0.0) is FIRING
    assert rule.evaluate(0.4, 5.0) is FIRING
    assert rule.evaluate(1.0, 10.0) is FIRING  # breaching again restarts the clear timer
    assert rule.evaluate(0.4, 15.0) is FIRING
    assert rule.evaluate(0.4, 34.9) is FIRING
    assert rule.evaluate(0.4, 35.0) is INACTIVE


def test_nan_resets_by_default_and_holds_when_asked():
    reset = ThresholdRule(name="r", threshold=0.5, for_s=10.0)
    hold = ThresholdRule(name="h", threshold=0.5, for_s=10.0, nan_policy="hold")
    for rule in (reset, hold):
        rule.evaluate(1.0, 0.0)
    assert reset.evaluate(math.nan, 5.0) is INACTIVE
    assert hold.evaluate(math.nan, 5.0) is PENDING
    assert reset.evaluate(1.0, 10.0) is PENDING
    assert hold.evaluate(1.0, 10.0) is FIRING  # the breach that began at 0 still counts
    assert math.isnan(ThresholdRule(name="x", threshold=1.0).last_value)


def test_time_never_runs_backwards():
    rule = ThresholdRule(name="lat", threshold=0.5, for_s=10.0)
    rule.evaluate(1.0, 100.0)
    assert rule.evaluate(1.0, 50.0) is PENDING
    assert rule.last_evaluated == 100.0
    with pytest.raises(DetectorConfigError):
        rule.evaluate(1.0, math.nan)


def test_reset_and_describe():
    rule = ThresholdRule(name="lat", threshold=0.5, for_s=10.0, signal="p95 latency (s)")
    rule.evaluate(0.8, 0.0)
    assert rule.describe() == "lat: p95 latency (s) 0.8 > 0.5 for 10s (pending)"
    rule.reset()
    assert rule.state is INACTIVE and rule.last_evaluated is None and math.isnan(rule.last_value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": "", "threshold": 1.0},
        {"name": 3, "threshold": 1.0},
        {"name": "x", "threshold": math.nan},
        {"name": "x", "threshold": 1.0, "for_s": -1.0},
        {"name": "x", "threshold": 1.0, "for_s": math.inf},
        {"name": "x", "threshold": 1.0, "above": "yes"},
        {"name": "x", "threshold": 1.0, "keep_firing_for_s": -0.1},
        {"name": "x", "threshold": 1.0, "nan_policy": "ignore"},
    ],
)
def test_rule_validates(kwargs):
    with pytest.raises(DetectorConfigError) as info:
        ThresholdRule(**kwargs)
    assert isinstance(info.value, ValueError)


# value, time step; value None means NaN (no data)
steps = st.lists(
    st.tuples(st.one_of(st.none(), st.floats(min_value=0.0, max_value=2.0)), st.floats(min_value=0.0, max_value=5.0)),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(steps=steps, for_s=st.floats(min_value=0.0, max_value=15.0), policy=st.sampled_from(["reset", "hold"]))
def test_fires_exactly_when_the_breach_has_lasted_for_s(steps, for_s, policy):
    rule = ThresholdRule(name="p", threshold=1.0, for_s=for_s, nan_policy=policy)
    t = 0.0
    run_start: float | None = None  # start of the current unbroken breach, by the reference model
    state = INACTIVE
    for value, dt in steps:
        t += dt
        got = rule.evaluate(math.nan if value is None else value, t)
        if value is None:
            if policy == "reset":
                run_start, state = None, INACTIVE
        elif value > 1.0:
            run_start = t if run_start is None else run_start
            state = FIRING if t - run_start >= for_s else PENDING
        else:
            run_start, state = None, INACTIVE
        assert got is state
        assert rule.active_since == run_start


def test_latency_rule_on_a_window():
    rule = latency_above(0.5, quantile=0.95, for_s=20.0)
    assert rule.name == "latency_p95_above" and rule.above and rule.threshold == 0.5
    window = RollingWindow(horizon_s=10.0)
    states = []
    for second in range(60):
        latency = 0.1 if second < 20 else 0.9
        for k in range(10):
            window.add(latency, second + k / 10)
        states.append(rule.evaluate(window.quantiles([0.95], second + 0.95)[0], second + 0.95))
    assert states[19] is INACTIVE
    assert PENDING in states[20:40]
    assert states[-1] is FIRING
    assert latency_above(1.0, quantile=0.999).name == "latency_p99_9_above"


def test_error_rate_rule_on_a_ratio_window():
    rule = error_rate_above(0.05, for_s=0.0)
    window = RatioWindow(horizon_s=60.0)
    for i in range(100):
        window.add(i % 10 != 0, float(i) * 0.1)  # 10% errors
    assert rule.evaluate(window.ratio(10.0), 10.0) is FIRING
    assert rule.evaluate(RatioWindow(horizon_s=1.0).ratio(11.0), 11.0) is INACTIVE  # empty: NaN


def test_memory_and_throughput_rules():
    mem = memory_percent_above(90.0, for_s=0.0)
    assert mem.evaluate(95.0, 0.0) is FIRING and mem.name == "memory_percent_above"
    slow = throughput_below(5.0, for_s=0.0)
    assert not slow.above
    window = RollingWindow(horizon_s=10.0)
    for i in range(20):  # 2 per second
        window.add(0.1, i * 0.5)
    assert slow.evaluate(window.rate(10.0), 10.0) is FIRING
    assert throughput_below(1.0, for_s=0.0).evaluate(window.rate(10.0), 10.0) is INACTIVE


@pytest.mark.parametrize(
    "make",
    [
        lambda: latency_above(-1.0),
        lambda: latency_above(1.0, quantile=1.5),
        lambda: error_rate_above(1.5),
        lambda: error_rate_above(-0.1),
        lambda: memory_percent_above(101.0),
        lambda: throughput_below(-1.0),
        lambda: throughput_below(1.0, for_s=-5.0),
        lambda: latency_above(1.0, name=""),
    ],
)
def test_rule_helpers_validate(make):
    with pytest.raises(DetectorConfigError):
        make()


def test_rule_state_values_are_prometheus_names():
    assert [s.value for s in RuleState] == ["inactive", "pending", "firing"]
    assert RuleState.FIRING == "firing"
