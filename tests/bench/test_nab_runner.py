"""The NAB runner scores what the sidecar would page for: judge_point is the tick's own statistical path."""

from __future__ import annotations

import numpy as np
import pytest

from alerting import AlertBook
from bench._nab import load_corpus
from bench._nab.corpus import default_data_dir
from bench._nab.runner import COMBINED, DETECTORS, onsets
from sidecar.config import DetectorsConfig, MonitorConfig, StatisticalConfig
from sidecar.evaluation import ALERT_ANOMALY, Evaluator
from sidecar.monitor import PerformanceMonitor
from sidecar.otlp import REQUEST, SpanSample

DATA = default_data_dir()


def _transitions(alerts, i):
    return [(i, a.labels["detector"], a.status) for a in alerts if a.labels["alertname"] == ALERT_ANOMALY]


def test_judge_point_gives_the_same_alerts_as_ticks_over_real_traffic():
    rng = np.random.default_rng(5)
    p95 = np.exp(rng.normal(0.0, 0.1, 400))
    p95[250:300] *= 4.0
    p95[330] *= 8.0
    config = DetectorsConfig(latency={"enabled": False}, error_rate={"enabled": False},
                             statistical={"cusum": {"enabled": True}})
    st = config.statistical

    monitor = PerformanceMonitor(windows=MonitorConfig().windows)
    ticked = Evaluator(config, monitor=monitor, book=AlertBook())
    via_ticks = []
    ticked.tick(0.0, 0.0)  # starts the series' first interval
    for i, value in enumerate(p95):
        now = (i + 1) * st.interval_s
        for _ in range(st.min_count):  # identical requests: the interval's p95 is the value itself
            monitor.record(SpanSample(REQUEST, "m", "chat", float(value), False), now)
        via_ticks += _transitions(ticked.tick(now, now), i)

    direct = Evaluator(config, monitor=PerformanceMonitor(windows=MonitorConfig().windows), book=AlertBook())
    via_points = []
    for i, value in enumerate(p95):
        now = (i + 1) * st.interval_s
        via_points += _transitions(direct.judge_point("m", "chat", float(value), now, now), i)
    assert via_ticks == via_points
    assert any(status == "firing" for _, _, status in via_points)


@pytest.mark.skipif(not (DATA / "labels" / "combined_windows.json").is_file(), reason=f"NAB data not at {DATA}")
def test_onsets_are_alert_starts_and_the_default_pages_once_per_incident():
    f = load_corpus(DATA, names=["realKnownCause/ec2_request_latency_system_failure.csv"]).files[0]
    shipped = StatisticalConfig()
    out = onsets(f, shipped)
    assert set(out) == {*DETECTORS, COMBINED}
    for name, det in out.items():
        assert det.shape == (len(f),) and set(np.unique(det)) <= {0.0, 1.0}, name
    enabled = [n for n in DETECTORS if getattr(shipped, n).enabled]
    union = np.max([out[n] for n in enabled], axis=0)
    # The combination is its own run: while one detector's alert fires, another's finding is the same incident.
    assert 1 <= out[COMBINED].sum() <= union.sum()
    # One detector alone is the combination of one.
    alone = shipped.model_copy(update={n: getattr(shipped, n).model_copy(update={"enabled": n == "ewma"})
                                       for n in DETECTORS})
    assert np.array_equal(onsets(f, alone, ())[COMBINED], out["ewma"])


def test_bench_says_clearly_where_it_looked_when_nab_is_missing(tmp_path, capsys):
    from bench import nab

    assert nab.main(["--data-dir", str(tmp_path / "nowhere"), "--results-dir", str(tmp_path / "results")]) == 2
    err = capsys.readouterr().err
    assert "NAB data not found" in err and str(tmp_path / "nowhere") in err and "--data-dir" in err
    assert not (tmp_path / "results").exists()
