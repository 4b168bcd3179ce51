"""Rate limiting and grouping: token bucket, Alertmanager-like groups, pass-through with resends."""

from __future__ import annotations

import itertools

import pytest
from alerting_helpers import make_alert
from hypothesis import given, settings
from hypothesis import strategies as st

from alerting import (
    ALL_LABELS,
    AlertingConfigError,
    AlertState,
    Notification,
    Passthrough,
    Throttle,
    TokenBucket,
)

# -- token bucket ------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    capacity=st.integers(min_value=1, max_value=20),
    rate=st.floats(min_value=0.01, max_value=50.0),
    gaps=st.lists(st.floats(min_value=0.0, max_value=2.0), min_size=1, max_size=300),
    window=st.floats(min_value=0.01, max_value=10.0),
)
def test_bucket_never_lets_more_than_capacity_plus_rate_times_window(capacity, rate, gaps, window) -> None:
    bucket = TokenBucket(capacity=capacity, rate_per_s=rate)
    times = list(itertools.accumulate(gaps))
    passed = [t for t in times if bucket.try_take(t)]
    limit = capacity + rate * window + 1e-9
    for i, start in enumerate(passed):
        in_window = sum(1 for t in passed[i:] if t <= start + window)
        assert in_window <= limit


def test_bucket_refills_and_tolerates_a_clock_stepping_back() -> None:
    bucket = TokenBucket(capacity=2, rate_per_s=1.0)
    assert bucket.try_take(0.0) and bucket.try_take(0.0) and not bucket.try_take(0.0)
    assert not bucket.try_take(-100.0)  # stepping back refills nothing
    assert bucket.try_take(1.0)
    assert bucket.available(100.0) == 2.0


@pytest.mark.parametrize("kwargs", [{"capacity": 0.5, "rate_per_s": 1}, {"capacity": 1, "rate_per_s": 0},
                                    {"capacity": float("inf"), "rate_per_s": 1}])
def test_bucket_config_is_checked(kwargs) -> None:
    with pytest.raises(AlertingConfigError):
        TokenBucket(**kwargs)


# -- throttle ----------------------------------------------------------------------------------


def _throttle(**kw) -> Throttle:
    base = dict(group_wait_s=30.0, group_interval_s=300.0, repeat_interval_s=3600.0, burst=100, rate_per_s=10.0)
    return Throttle(**{**base, **kw})


def test_alerts_that_fire_together_go_out_together_after_group_wait() -> None:
    th = _throttle()
    th.offer(make_alert(gpu="0", at=0.0), 0.0)
    th.offer(make_alert(gpu="1", at=5.0), 5.0)
    th.offer(make_alert("GpuMemoryHigh", gpu="0", at=6.0), 6.0)
    assert th.next_due() == 30.0
    assert th.flush(29.9) == []
    notes = th.flush(30.0)
    assert len(notes) == 1
    (note,) = notes
    assert note.group_key == '{}:{alertname="HighLatency"}'
    assert dict(note.group_labels) == {"alertname": "HighLatency"}
    assert [a.labels["gpu"] for a in note.alerts] == ["0", "1"]
    assert note.status == "firing"
    (other,) = th.flush(36.0)
    assert other.group_labels["alertname"] == "GpuMemoryHigh"


def test_joiners_wait_for_the_group_interval_and_steady_state_waits_for_repeat() -> None:
    th = _throttle()
    th.offer(make_alert(gpu="0", at=0.0), 0.0)
    assert len(th.flush(30.0)) == 1
    th.offer(make_alert(gpu="1", at=40.0), 40.0)
    assert th.flush(40.0) == [] and th.next_due() == 330.0
    (note,) = th.flush(330.0)
    assert len(note.alerts) == 2
    # Nothing changes: silent at every interval until the repeat interval has passed.
    for t in (630.0, 930.0, 1230.0, 3630.0):
        assert th.flush(t) == [], t
    (repeat,) = th.flush(3930.0)
    assert {a.labels["gpu"] for a in repeat.alerts} == {"0", "1"}
    assert th.suppressed == {}


def test_resolution_is_notified_once_then_the_group_is_forgotten() -> None:
    th = _throttle()
    fired = make_alert(gpu="0", at=0.0)
    th.offer(fired, 0.0)
    th.flush(30.0)
    th.offer(make_alert(gpu="0", state=AlertState.RESOLVED, at=0.0, ends=100.0), 100.0)
    (note,) = th.flush(330.0)
    assert note.status == "resolved"
    assert [a.state for a in note.alerts] == [AlertState.RESOLVED]
    assert th.group_count == 0 and th.next_due() is None
    assert th.flush(10_000.0) == []


def test_partial_resolution_lists_firing_first_and_status_stays_firing() -> None:
    th = _throttle()
    th.offer(make_alert(gpu="0", at=0.0), 0.0)
    th.offer(make_alert(gpu="1", at=0.0), 0.0)
    th.flush(30.0)
    th.offer(make_alert(gpu="0", state=AlertState.RESOLVED, at=0.0, ends=50.0), 50.0)
    (note,) = th.flush(330.0)
    assert note.status == "firing"
    assert [(a.labels["gpu"], a.status) for a in note.alerts] == [("1", "firing"), ("0", "resolved")]
    assert th.flush(630.0) == []  # the resolved one is gone, the firing one is not due for repeat


def test_fired_and_resolved_before_anyone_heard_is_not_sent() -> None:
    th = _throttle()
    th.offer(make_alert(gpu="0", at=0.0), 0.0)
    th.offer(make_alert(gpu="0", state=AlertState.RESOLVED, at=0.0, ends=10.0), 10.0)
    assert th.flush(30.0) == []
    th.offer(make_alert(gpu="9", state=AlertState.RESOLVED, at=0.0, ends=10.0), 40.0)
    assert th.suppressed == {"resolved_before_notify": 2}
    assert th.group_count == 0


def test_an_undelivered_firing_notification_is_sent_again_at_the_next_interval() -> None:
    th = _throttle()
    th.offer(make_alert(gpu="0", at=0.0), 0.0)
    (note,) = th.flush(30.0)
    assert th.flush(330.0) == []  # believed heard: nothing until the repeat interval
    th.undelivered(note, 340.0)  # the dispatcher gave up on it
    (again,) = th.flush(630.0)  # the group's next interval
    assert [(a.labels["gpu"], a.status) for a in again.alerts] == [("0", "firing")]
    assert th.flush(930.0) == []
    assert th.suppressed == {"undelivered": 1}


def test_an_undelivered_resolution_comes_back_even_after_its_group_was_forgotten() -> None:
    th = _throttle()
    th.offer(make_alert(gpu="0", at=0.0), 0.0)
    th.flush(30.0)
    th.offer(make_alert(gpu="0", state=AlertState.RESOLVED, at=0.0, ends=100.0), 100.0)
    (resolved,) = th.flush(330.0)
    assert th.group_count == 0
    th.undelivered(resolved, 350.0)
    (again,) = th.flush(630.0)
    assert [(a.labels["gpu"], a.status) for a in again.alerts] == [("0", "resolved")]
    assert th.group_count == 0 and th.flush(10_000.0) == []


def test_an_alert_whose_firing_was_never_delivered_resolves_silently() -> None:
    th = _throttle()
    th.offer(make_alert(gpu="0", at=0.0), 0.0)
    th.offer(make_alert(gpu="1", at=0.0), 0.0)
    (note,) = th.flush(30.0)
    th.offer(make_alert(gpu="0", state=AlertState.RESOLVED, at=0.0, ends=40.0), 40.0)
    th.undelivered(note, 50.0)
    (again,) = th.flush(330.0)
    # The receiver never heard gpu 0 fire: no "resolved" for it, only gpu 1's firing state again.
    assert [(a.labels["gpu"], a.status) for a in again.alerts] == [("1", "firing")]
    assert th.suppressed == {"undelivered": 1, "resolved_before_notify": 1}


def test_a_newer_notification_already_carrying_the_alert_is_not_repeated() -> None:
    th = _throttle()
    th.offer(make_alert(gpu="0", at=0.0), 0.0)
    (first,) = th.flush(30.0)
    th.offer(make_alert(gpu="1", at=40.0), 40.0)
    (second,) = th.flush(330.0)  # carries gpu 0 and gpu 1, both firing
    th.undelivered(first, 340.0)
    assert th.flush(630.0) == []


def test_bucket_defers_a_group_to_its_next_interval_and_counts_it() -> None:
    th = _throttle(burst=1, rate_per_s=1 / 200)
    th.offer(make_alert("A", at=0.0), 0.0)
    th.offer(make_alert("B", at=0.0), 0.0)
    first = th.flush(30.0)
    assert len(first) == 1 and th.suppressed == {"rate_limited": 1}
    late = th.flush(330.0)  # a token has refilled by then
    assert len(late) == 1 and late[0].group_labels != first[0].group_labels


def test_group_by_all_labels_and_limits() -> None:
    th = _throttle(group_by=[ALL_LABELS], max_groups=2)
    for gpu in "012":
        th.offer(make_alert(gpu=gpu, at=0.0), 0.0)
    assert th.group_count == 2 and th.suppressed == {"group_limit": 1}
    th2 = _throttle(max_alerts_per_group=1)
    th2.offer(make_alert(gpu="0", at=0.0), 0.0)
    th2.offer(make_alert(gpu="1", at=0.0), 0.0)
    th2.offer(make_alert(gpu="0", at=1.0), 1.0)  # an update of a tracked alert is always taken
    assert th2.suppressed == {"group_full": 1}


def test_pending_alerts_are_ignored() -> None:
    th = _throttle()
    th.offer(make_alert(state=AlertState.PENDING, at=0.0), 0.0)
    assert th.group_count == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"group_by": "alertname"},
        {"group_by": ["bad-name"]},
        {"group_by": [ALL_LABELS, "gpu"]},
        {"group_wait_s": -1},
        {"group_interval_s": 0},
        {"repeat_interval_s": 10, "group_interval_s": 20},
        {"burst": 0},
        {"rate_per_s": -1},
        {"max_groups": 0},
    ],
)
def test_throttle_config_is_checked(kwargs) -> None:
    with pytest.raises(AlertingConfigError):
        Throttle(**kwargs)


def _storm(th: Throttle, *, n_names: int, n_gpus: int, horizon: float, step: float) -> list[Notification]:
    out: list[Notification] = []
    arrivals = sorted(
        (i * 0.9 / (n_names * n_gpus), name, gpu)
        for i, (name, gpu) in enumerate(itertools.product(range(n_names), range(n_gpus)))
    )
    t = 0.0
    k = 0
    while t <= horizon:
        while k < len(arrivals) and arrivals[k][0] <= t:
            at, name, gpu = arrivals[k]
            th.offer(make_alert(f"Anomaly{name}", gpu=str(gpu), at=at), t)
            k += 1
        out.extend(th.flush(t))
        t += step
    return out


def test_storm_becomes_a_bounded_number_of_notifications() -> None:
    """500 alerts within a second become at most burst + rate * horizon notifications."""
    burst, rate, horizon = 5, 0.05, 120.0
    th = _throttle(group_wait_s=1.0, group_interval_s=10.0, repeat_interval_s=600.0, burst=burst, rate_per_s=rate)
    notes = _storm(th, n_names=50, n_gpus=10, horizon=horizon, step=0.1)
    assert 0 < len(notes) <= burst + rate * horizon
    assert sum(len(n.alerts) for n in notes) >= burst * 10  # each notification carries a whole group
    assert th.suppressed["rate_limited"] > 0
    for note in notes:
        assert len({a.labels["alertname"] for a in note.alerts}) == 1


@settings(max_examples=60, deadline=None)
@given(
    events=st.lists(
        st.tuples(st.floats(0, 5), st.integers(0, 7), st.integers(0, 3), st.booleans()),
        min_size=1,
        max_size=80,
    ),
    burst=st.integers(1, 4),
    rate=st.floats(0.01, 1.0),
    interval=st.floats(0.5, 5.0),
)
def test_throttle_property_bucket_bound_and_group_spacing(events, burst, rate, interval) -> None:
    th = Throttle(group_wait_s=0.5, group_interval_s=interval, repeat_interval_s=interval * 3,
                  burst=burst, rate_per_s=rate)
    now, notes = 0.0, []
    for gap, name, gpu, firing in events:
        now += gap
        state = AlertState.FIRING if firing else AlertState.RESOLVED
        th.offer(make_alert(f"A{name}", state=state, at=0.0, ends=now, gpu=str(gpu)), now)
        notes.extend(th.flush(now))
    end = now + 10 * interval
    while now < end:
        now += interval / 3
        notes.extend(th.flush(now))
    assert len(notes) <= burst + rate * now + 1e-9
    by_group: dict[str, list[float]] = {}
    for note in notes:
        by_group.setdefault(note.group_key, []).append(note.created_at)
    for times in by_group.values():
        assert all(b - a >= interval - 1e-9 for a, b in zip(times, times[1:]))


# -- pass-through ------------------------------------------------------------------------------


def test_passthrough_sends_changes_at_once_and_resends_firing_alerts() -> None:
    p = Passthrough(resend_interval_s=60.0)
    a = make_alert(gpu="0", at=0.0)
    b = make_alert(gpu="1", at=0.0)
    p.offer(a, 0.0)
    p.offer(b, 0.0)
    assert p.next_due() == 0.0
    (note,) = p.flush(0.0)
    assert note.alerts == (a, b) and note.group_key == ""
    assert p.next_due() == 60.0 and p.due_reposts(59.0) == []
    assert {x.fingerprint for x in p.due_reposts(60.0)} == {a.fingerprint, b.fingerprint}
    p.offer(make_alert(gpu="1", state=AlertState.RESOLVED, at=0.0, ends=30.0), 30.0)
    (note,) = p.flush(30.0)
    assert [x.status for x in note.alerts] == ["resolved"]
    (resend,) = p.flush(60.0)
    assert resend.alerts == (a,)
    assert p.flush(61.0) == [] and p.next_due() == 120.0


def test_passthrough_without_resends_and_with_a_limit() -> None:
    p = Passthrough(resend_interval_s=None, max_alerts=1)
    p.offer(make_alert(gpu="0", at=0.0), 0.0)
    p.offer(make_alert(gpu="1", at=0.0), 0.0)
    assert len(p.flush(0.0)[0].alerts) == 1
    assert p.suppressed == {"alert_limit": 1}
    assert p.next_due() is None and p.flush(1e9) == []
    with pytest.raises(AlertingConfigError):
        Passthrough(resend_interval_s=0)


def test_an_alert_firing_again_right_after_its_group_emptied_waits_out_the_group_interval():
    # Found by the property above: the resolution emptied the group, the re-fire made a new group of the same key,
    # and it notified after group_wait alone, one second after the last notification of that key.
    th = Throttle(group_wait_s=0.5, group_interval_s=3.0, repeat_interval_s=9.0, burst=10, rate_per_s=10.0)
    th.offer(make_alert("A", state=AlertState.FIRING, at=0.0), 0.0)
    assert len(th.flush(1.0)) == 1
    th.offer(make_alert("A", state=AlertState.RESOLVED, at=0.0, ends=1.0), 1.0)
    assert [n.alerts[0].state for n in th.flush(4.0)] == [AlertState.RESOLVED] and th.group_count == 0
    th.offer(make_alert("A", state=AlertState.FIRING, at=4.0), 4.0)
    assert th.flush(5.0) == [] and th.flush(6.9) == []
    assert [n.created_at for n in th.flush(7.0)] == [7.0]
