"""DailyRecurrence / RecurringGate: a daily peak is the cycle, a level never reached at this time is not."""

from __future__ import annotations

import math

import pytest

from detectors import DailyRecurrence, DetectorConfigError, EwmaDetector, RecurringGate, Verdict

DAY = 86_400.0
STEP = 300.0


def _cycle(t: float) -> float:
    # One hour-long peak a day (at noon), flat otherwise: the shape an EWMA's trailing mean pages on every day.
    return 10.0 if 12 * 3600 <= t % DAY < 13 * 3600 else 1.0


def test_a_level_counts_only_when_reached_near_this_time_on_every_past_day():
    rec = DailyRecurrence(days=2, window_s=1800)
    for i in range(int(2 * DAY / STEP)):
        t = i * STEP
        rec.add(_cycle(t), t)
    noon = 2 * DAY + 12 * 3600
    assert rec.reached(10.0, noon) == 2 and rec.recurs(10.0, noon)
    assert not rec.recurs(10.5, noon)  # higher than any day's peak
    assert rec.reached(10.0, noon - 3 * 3600) == 0  # the peak, but three hours early
    assert rec.recurs(10.0, noon - 1500)  # within the window of the peak's start


def test_a_level_seen_on_one_day_only_does_not_recur():
    rec = DailyRecurrence(days=2, window_s=1800)
    for i in range(int(2 * DAY / STEP)):
        t = i * STEP
        rec.add(50.0 if DAY + 6 * 3600 <= t < DAY + 7 * 3600 else 1.0, t)  # yesterday's incident
    at = 2 * DAY + 6 * 3600
    assert rec.reached(50.0, at) == 1 and not rec.recurs(50.0, at)


def test_memory_stays_bounded_and_old_days_are_forgotten():
    rec = DailyRecurrence(days=2, window_s=1800)
    for i in range(int(10 * DAY / 10.0)):
        rec.add(1.0, i * 10.0)
    # One slice per window / 6 over two days and a window.
    assert rec.memory <= 2 * DAY / 300 + 8
    rec.add(100.0, 10 * DAY)
    assert rec.reached(100.0, 11 * DAY) == 1 and rec.reached(100.0, 12 * DAY) == 1
    rec.add(1.0, 13 * DAY)  # three days later that day is out of the history, and forgotten
    assert rec.reached(100.0, 12 * DAY) == 0


def test_the_gate_survives_a_copy():
    import copy

    gate = RecurringGate(EwmaDetector(warmup=5), days=1, window_s=600)
    for i in range(10):
        gate.update(1.0, i * 60.0)
    clone = copy.deepcopy(gate)
    assert clone.warming_up is False and clone.score() == gate.score()


@pytest.mark.parametrize("kw", [{"days": 0}, {"window_s": 0.0}, {"window_s": DAY / 2}, {"period_s": -1.0}])
def test_bad_configuration_is_refused(kw):
    with pytest.raises(DetectorConfigError):
        DailyRecurrence(**kw)


def test_gate_reports_a_daily_peak_normal_but_a_new_level_anomalous():
    inner = EwmaDetector(alpha=0.01, z_threshold=3.5, warmup=100, min_std=0.05)
    gated = RecurringGate(EwmaDetector(alpha=0.01, z_threshold=3.5, warmup=100, min_std=0.05), days=2, window_s=1800)
    alone_flags, gated_flags = [], []
    for i in range(int(4 * DAY / STEP)):
        t = i * STEP
        x = math.log(_cycle(t))
        if 3 * DAY + 3 * 3600 <= t < 3 * DAY + 4 * 3600:
            x = math.log(30.0)  # an incident at a time of day that never saw it
        a, g = inner.update(x, t), gated.update(x, t)
        assert (a is None) == (g is None)
        if a is not None:
            assert isinstance(g, Verdict) and g.score == a.score and g.baseline == a.baseline
            alone_flags.append((t, a.anomalous))
            gated_flags.append((t, g.anomalous))
    noon_days = [d for d in (2, 3) if any(f for t, f in alone_flags if d * DAY + 12 * 3600 <= t < d * DAY + 13 * 3600)]
    assert noon_days  # the EWMA alone pages on the daily peak...
    for d in (2, 3):  # ...the gate, once two days of peaks are behind it, does not
        assert not any(f for t, f in gated_flags if d * DAY + 12 * 3600 <= t < d * DAY + 13 * 3600)
    assert any(f for t, f in gated_flags if 3 * DAY + 3 * 3600 <= t < 3 * DAY + 4 * 3600)
    assert gated.score() == inner.score() and gated.name == "ewma" and gated.baseline == inner.baseline
