"""The false-alarm budget `bench nab` prints beside the NAB scores: alerts of the default detectors on healthy,
daily-cycling simulated traffic, counted through the sidecar's own Evaluator."""

from __future__ import annotations

import numpy as np

from bench._nab.stationary import false_alerts, false_alerts_per_48h, interval_p95s
from sidecar.config import StatisticalConfig


def test_points_are_interval_p95s_of_healthy_traffic_with_a_daily_cycle():
    ends, p95 = interval_p95s(3, hours=24, rps=5.0)
    assert len(ends) == len(p95) == 24 * 360
    assert np.all(np.diff(ends) == 10.0)
    # The p95 of lognormal(0, 0.4) latencies is about exp(1.645 * 0.4) = 1.93 s; the daily cycle moves it +-20%.
    assert 1.6 < float(np.median(p95)) < 2.3
    hourly = np.log(p95).reshape(24, -1).mean(axis=1)
    assert hourly.max() - hourly.min() > 0.25  # the cycle is there


def test_quiet_intervals_merge_with_the_next_as_the_sidecar_does():
    ends, p95 = interval_p95s(1, hours=2, rps=0.2, min_count=5)
    assert len(ends) < 2 * 360 and np.all(np.diff(ends) >= 10.0) and np.isfinite(p95).all()


def test_the_budget_figure_is_computed_and_counts_alerts():
    quiet = false_alerts_per_48h(StatisticalConfig(), seeds=2, hours=6)
    assert quiet["seeds"] == 2 and quiet["hours"] == 6 and len(quiet["counts"]) == 2
    assert quiet["per_48h"] == np.mean(quiet["counts"]) * 8
    # A hair-trigger EWMA pages on this healthy traffic: the figure sees false alarms when there are some.
    jumpy = StatisticalConfig(ewma={"z_threshold": 0.5, "smoothing": 1.0}, clear_after_s=60.0)
    assert false_alerts(jumpy, 0, hours=6) > 0


def test_the_shipped_new_maximum_is_quiet_on_two_healthy_days_and_pages_on_a_threefold_slowdown():
    from alerting import AlertBook
    from sidecar.config import DetectorsConfig, MonitorConfig
    from sidecar.evaluation import ALERT_ANOMALY, Evaluator
    from sidecar.monitor import PerformanceMonitor

    only = StatisticalConfig(ewma={"enabled": False})  # the new maximum alone, as shipped
    assert only.novelty.enabled
    assert false_alerts(only, 2, hours=48, rps=2.0) == 0
    ends, p95 = interval_p95s(4, hours=32, rps=5.0)
    change = 30 * 3600.0
    p95 = np.where(ends > change, 3.0 * p95, p95)
    ev = Evaluator(DetectorsConfig(statistical=only), monitor=PerformanceMonitor(windows=MonitorConfig().windows),
                   book=AlertBook())
    fired = [now for now, v in zip(ends.tolist(), p95.tolist(), strict=True)
             for a in ev.judge_point("m", "chat", v, now, now)
             if a.status == "firing" and a.labels["alertname"] == ALERT_ANOMALY]
    assert fired and change < fired[0] <= change + 120.0, fired[:3]


def test_the_shipped_new_minimum_pages_when_requests_start_failing_fast():
    from alerting import AlertBook
    from sidecar.config import DetectorsConfig, MonitorConfig
    from sidecar.evaluation import ALERT_ANOMALY, Evaluator
    from sidecar.monitor import PerformanceMonitor

    only = StatisticalConfig(ewma={"enabled": False})
    assert only.novelty.direction == "both"
    ends, p95 = interval_p95s(6, hours=32, rps=5.0)
    change = 30 * 3600.0
    p95 = np.where(ends > change, p95 / 5.0, p95)  # an error path that answers five times faster
    ev = Evaluator(DetectorsConfig(statistical=only), monitor=PerformanceMonitor(windows=MonitorConfig().windows),
                   book=AlertBook())
    fired = [(now, a) for now, v in zip(ends.tolist(), p95.tolist(), strict=True)
             for a in ev.judge_point("m", "chat", v, now, now)
             if a.status == "firing" and a.labels["alertname"] == ALERT_ANOMALY]
    assert fired and change < fired[0][0] <= change + 120.0, [t for t, _ in fired[:3]]
    assert "lower than this series has been" in fired[0][1].annotations["description"]
