"""The false-alarm budget beside the NAB scores: the sidecar's default detectors on healthy traffic.

A score gain on NAB that pages an operator on a healthy model is no gain (issue 17), so ``bench nab`` also runs
the default combination over the sidecar's stationary simulation and counts the ``LatencyAnomaly`` alerts it
raises. The traffic is what ``tests/sidecar/test_sidecar_detector_noise.py`` simulates (Poisson arrivals,
lognormal latencies with median 1 s and log-sd 0.4), made longer and given a daily cycle: the request rate
swings by half its mean over 24 h and the median latency by +-20% with it, as a busy but healthy model's does.
Nothing here is anomalous, so every alert is a false one.

Equivalent to the test's tick-by-tick drive, and much faster: one point per ``statistical.interval_s`` is built
the way ``Evaluator._interval_p95`` builds it (the p95 of the requests that finished in the interval, a quiet
interval merged with the next) and fed through ``Evaluator.judge_point``, so the detectors and the alert
lifecycle are the sidecar's own.
"""

from __future__ import annotations

import math

import numpy as np

from alerting import AlertBook
from sidecar.config import DetectorsConfig, MonitorConfig, StatisticalConfig
from sidecar.evaluation import ALERT_ANOMALY, Evaluator
from sidecar.monitor import PerformanceMonitor

DAY_S = 86_400.0
HOURS = 48.0
SEEDS = 20
RATES = (2.0, 5.0)  # mean requests per second, alternating over seeds (the noise test's two rates)
RATE_SWING = 0.5  # the request rate's daily swing, as a fraction of its mean
LATENCY_SWING = math.log(1.2)  # the median latency's daily swing on the log scale (+-20%)
LOG_SD = 0.4
GOAL_PER_48H = 0.1


def interval_p95s(seed: int, *, hours: float = HOURS, rps: float = 5.0, interval_s: float = 10.0,
                  min_count: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """``(ends, p95s)``: one point per interval of healthy traffic with a daily cycle, and when it closed."""
    rng = np.random.default_rng(seed)
    n = int(round(hours * 3600.0 / interval_s))
    phase = rng.uniform(0.0, 2.0 * math.pi)
    mids = (np.arange(n) + 0.5) * interval_s
    cycle = np.sin(2.0 * math.pi * mids / DAY_S + phase)
    counts = rng.poisson(rps * interval_s * (1.0 + RATE_SWING * cycle))
    ends, p95s, pending = [], [], []
    for i, (k, c) in enumerate(zip(counts.tolist(), cycle.tolist(), strict=True)):
        pending.append(rng.lognormal(LATENCY_SWING * c, LOG_SD, k))
        if sum(len(p) for p in pending) < min_count:
            continue  # a quiet interval: merged with the next, as the sidecar does
        ends.append((i + 1) * interval_s)
        p95s.append(float(np.quantile(np.concatenate(pending), 0.95)))
        pending = []
    return np.array(ends), np.array(p95s)


def false_alerts(config: StatisticalConfig, seed: int, *, hours: float = HOURS, rps: float = 5.0) -> int:
    """LatencyAnomaly alerts the detectors ``config`` enables raise over ``hours`` of healthy traffic."""
    evaluator = Evaluator(DetectorsConfig(statistical=config), monitor=PerformanceMonitor(windows=MonitorConfig().windows),
                          book=AlertBook())
    ends, p95s = interval_p95s(seed, hours=hours, rps=rps, interval_s=config.interval_s, min_count=config.min_count)
    fired = 0
    for now, p95 in zip(ends.tolist(), p95s.tolist(), strict=True):
        for alert in evaluator.judge_point("m", "chat", p95, now, 1.7e9 + now):
            fired += alert.status == "firing" and alert.labels["alertname"] == ALERT_ANOMALY
    return fired


def false_alerts_per_48h(config: StatisticalConfig, *, seeds: int = SEEDS, hours: float = HOURS) -> dict:
    """Mean false alerts per 48 h over ``seeds`` simulated series (rates alternating over :data:`RATES`)."""
    counts = [false_alerts(config, seed, hours=hours, rps=RATES[seed % len(RATES)]) for seed in range(seeds)]
    return {"per_48h": float(np.mean(counts)) * 48.0 / hours, "counts": counts, "seeds": seeds, "hours": hours}
