"""The tuner's shell and store: the SQLite history, what it reads off the orchestrator, and the off switch."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from sidecar.config import SidecarConfig
from sidecar.monitor import PerformanceMonitor
from sidecar.otlp import REQUEST, SpanSample
from sidecar.tuner import LearnedTable, Observation, TunerConfig, TunerStore
from sidecar.tuner.policy import Decision
from sidecar.tuner.shell import Tuner, flat_settings, parse_metrics


def test_history_survives_reopening_and_warm_starts_a_table(tmp_path):
    path = tmp_path / "state" / "tuner.sqlite3"
    store = TunerStore(path)
    for i in range(4):
        store.add_observation(Observation(float(i), "L", {"batching.max_batch_size": 16}, 50.0 + i, 1.0, 55.0), 1000.0 + i)
    store.add_decisions([Decision(1.0, "batching.max_batch_size", 16, 32, "headroom", "tuned", "L", {"p99_s": 0.2})],
                        1001.0)
    store.close()

    reopened = TunerStore(path)
    assert reopened.counts() == (4, 1)
    table = LearnedTable(min_samples=3)
    assert table.load(reopened.observations()) == 4
    settings, goodput, attainment = table.best("L")
    assert settings == {"batching.max_batch_size": 16} and goodput == pytest.approx(51.5) and attainment == 1.0
    [decision] = reopened.recent_decisions(10)
    assert (decision["knob"], decision["old"], decision["new"], decision["readings"]) == (
        "batching.max_batch_size", 16, 32, {"p99_s": 0.2})
    reopened.prune(1000.0 + 7 * 86400.0 + 2.5)  # keeps what is younger than a week
    assert reopened.counts() == (1, 0)


def test_the_orchestrators_exposition_is_read_with_its_own_names():
    from orchestrator.metrics import ServerMetrics

    metrics = ServerMetrics(CollectorRegistry())
    metrics.bind_queue_gauges("m", lambda: 7.0, lambda: 16.0)
    for _ in range(3):
        metrics.reject("queue_full")
    metrics.reject("draining")  # a drain is not overload
    metrics.set_engine_stats("m", {"kv_cache_evictions": 5.0, "kv_cache_bytes": 1024.0})
    for status in ("ok", "ok", "error"):
        metrics.request_done("m", "completion", status)
    metrics.reject("queue_wait")  # a queue waiting past its bound is the tuner's own admission too
    for e2e in (0.2, 0.6, 3.0):
        metrics.model("m", "torch").observe(e2e_s=e2e, queue_s=0.0)
    metrics.model("m", "echo").observe(e2e_s=0.02, queue_s=0.0)  # engines of one model add up
    view = parse_metrics(generate_latest(metrics.registry).decode())
    assert view.waiting == {"m": 7.0} and view.running == {"m": 16.0}
    assert view.rejected_total == 4.0
    buckets = view.latency_buckets["m"]
    assert buckets[0.025] == 1 and buckets[0.25] == 2 and buckets[0.75] == 3 and buckets[math.inf] == 4
    assert view.finished_total == 2.0  # answered ones: an error says nothing of what the server can serve
    assert view.kv_evictions_total == 5.0 and view.kv_bytes == 1024.0
    assert view.continuous_batching == set()


def test_settings_come_from_the_admin_documents_nested_shape():
    doc = {"server": {"queue_capacity": 64, "max_running_per_model": None},
           "batching": {"max_batch_size": 8, "min_batch_size": 1, "batch_timeout_s": 0.002},
           "kv_cache": {"budget_bytes": 1 << 28}}
    assert flat_settings(doc) == {
        "server.queue_capacity": 64, "server.max_running_per_model": None, "batching.max_batch_size": 8,
        "batching.batch_timeout_s": 0.002, "kv_cache.budget_bytes": 1 << 28, "batching.min_batch_size": 1,
    }


def test_the_wait_bound_is_a_setting_when_the_orchestrator_has_the_key_even_while_off():
    doc = {"server": {"queue_capacity": 64, "max_queue_wait_s": None}, "batching": {"max_batch_size": 8}}
    assert flat_settings(doc) == {"server.queue_capacity": 64, "server.max_queue_wait_s": None,
                                  "batching.max_batch_size": 8}
    doc["server"]["max_queue_wait_s"] = 0.5
    assert flat_settings(doc)["server.max_queue_wait_s"] == 0.5


def test_fresh_figures_describe_only_the_requests_finished_since_the_last_tick(tmp_path):
    from orchestrator.metrics import ServerMetrics

    metrics = ServerMetrics(CollectorRegistry())
    monitor = PerformanceMonitor(windows={"10s": 10.0})
    tuner = _tuner(TunerConfig(admin_token="t" * 16, slo={"p99_s": 1.0}), tmp_path, monitor=monitor)
    for i in range(5):
        monitor.record(SpanSample(REQUEST, "m", "text_completion", 0.1, False), 99.0 + i * 0.1)

    def view():
        return parse_metrics(generate_latest(metrics.registry).decode())

    for _ in range(50):  # long ago, fast
        metrics.model("m", "torch").observe(e2e_s=0.05, queue_s=0.0)
    [first] = tuner.readings(view(), 100.0).models
    assert first.fresh_requests == 0 and math.isnan(first.fresh_p99_s)  # nothing to compare with yet
    for _ in range(30):  # since then: slow, a third of them late, after waiting in the queue
        metrics.model("m", "torch").observe(e2e_s=0.9, queue_s=0.6)
    for _ in range(15):
        metrics.model("m", "torch").observe(e2e_s=2.0, queue_s=0.6)
    [m] = tuner.readings(view(), 102.0).models
    assert m.fresh_requests == 45 and m.fresh()
    assert m.fresh_attainment == pytest.approx(30 / 45)
    assert 1.0 < m.fresh_p99_s <= 2.5  # in the (1, 2.5] bucket, read linearly within it
    assert 0.5 < m.fresh_queue_p99_s <= 1.0  # the queue waits since the last tick, not the fast ones before


def _tuner(config: TunerConfig, tmp_path, monitor=None, url="http://127.0.0.1:1") -> Tuner:
    monitor = monitor or PerformanceMonitor(windows={"10s": 10.0})
    return Tuner(config.model_copy(update={"state_dir": str(tmp_path)}), monitor=monitor, orchestrator_url=url,
                 registry=CollectorRegistry(), clock=lambda: 100.0, wall_clock=lambda: 1e9)


@pytest.mark.parametrize("config,reason", [
    (TunerConfig(enabled=False, admin_token="x" * 16), "disabled"),
    (TunerConfig(), "no admin token"),
])
def test_an_inactive_tuner_says_why_and_writes_nothing(tmp_path, config, reason):
    tuner = _tuner(config, tmp_path)
    assert not tuner.active and reason in tuner.reason
    assert tuner.store is None and not any(tmp_path.iterdir())
    described = tuner.describe()
    assert described["active"] is False and reason in described["status"]


def test_no_orchestrator_url_means_no_tuning(tmp_path):
    tuner = _tuner(TunerConfig(admin_token="x" * 16), tmp_path, url=None)
    assert not tuner.active and "orchestrator" in tuner.reason


def test_the_token_is_a_secret_everywhere():
    config = SidecarConfig(tuner={"admin_token": "s3cret-s3cret-s3cret"})
    dumped = config.model_dump_json()
    assert "s3cret" not in dumped and "**" in dumped
    assert config.tuner.admin_token.get_secret_value() == "s3cret-s3cret-s3cret"


def test_a_bad_knob_or_window_stops_start_up_naming_the_key():
    with pytest.raises(ValueError, match="unknown knob"):
        TunerConfig(knobs={"server.port": {"min": 1, "max": 2}})
    with pytest.raises(ValueError, match="sidecar.tuner.window"):
        SidecarConfig(tuner={"window": "3h"})


def test_readings_weigh_the_window_with_the_models_objective(tmp_path):
    monitor = PerformanceMonitor(windows={"10s": 10.0})
    config = TunerConfig(admin_token="x" * 16, slo={"p99_s": 0.5})
    tuner = _tuner(config, tmp_path, monitor=monitor)
    view = parse_metrics("")
    view.settings = {"server.queue_capacity": 32}
    tuner.readings(view, 0.0)  # the first look starts tracking the model's objective
    monitor.record(SpanSample(REQUEST, "m", "chat", 0.1, False, input_tokens=12), 1.0)  # before: not tracked
    tuner.readings(view, 1.0)
    for i, duration in enumerate([0.1, 0.2, 0.9, 0.3]):
        monitor.record(SpanSample(REQUEST, "m", "chat", duration, False, input_tokens=12), 2.0 + i)
    r = tuner.readings(view, 6.0)
    [m] = r.models
    assert m.model == "m" and m.slo_p99_s == 0.5
    assert m.attainment == pytest.approx(0.75)  # 3 of the 4 tracked within 0.5 s
    assert m.mean_input_tokens == pytest.approx(12.0)
    assert not math.isnan(m.p99_s) and r.settings == {"server.queue_capacity": 32}


def test_the_fresh_served_rate_is_the_orchestrators_own_count_between_two_ticks(tmp_path):
    tuner = _tuner(TunerConfig(admin_token="x" * 16), tmp_path)
    view = parse_metrics("")
    view.settings = {"server.queue_capacity": 32}
    view.finished_total = 100.0
    assert math.isnan(tuner.readings(view, 10.0).served_per_s), "one look is no rate"
    view.finished_total = 380.0
    assert tuner.readings(view, 12.0).served_per_s == pytest.approx(140.0)
    view.finished_total = 0.0  # the orchestrator restarted: no negative rate
    assert tuner.readings(view, 14.0).served_per_s == 0.0


def test_histogram_figures_between_two_readings():
    from sidecar.tuner.readings import histogram_delta, histogram_quantile, histogram_share_within

    before = {0.5: 10.0, 1.0: 10.0, 2.5: 10.0, math.inf: 10.0}
    now = {0.5: 10.0, 1.0: 90.0, 2.5: 100.0, math.inf: 100.0}  # 80 in (0.5, 1], 10 in (1, 2.5]
    delta = histogram_delta(now, before)
    assert delta == [(0.5, 0.0), (1.0, 80.0), (2.5, 90.0), (math.inf, 90.0)]
    assert histogram_share_within(delta, 1.0) == pytest.approx(80 / 90)
    assert histogram_share_within(delta, 0.75) == pytest.approx(40 / 90)  # linear inside its bucket
    assert histogram_quantile(delta, 0.5) == pytest.approx(0.5 + 0.5 * 45 / 80)
    assert 1.0 < histogram_quantile(delta, 0.99) <= 2.5
    # A counter that went down is a restarted orchestrator: everything it holds is new.
    assert histogram_delta({0.5: 3.0, math.inf: 4.0}, {0.5: 10.0, math.inf: 12.0}) == [(0.5, 3.0), (math.inf, 4.0)]
    # Past the last finite bound the quantile reads that bound; nothing new reads NaN.
    assert histogram_quantile([(1.0, 0.0), (math.inf, 5.0)], 0.99) == 1.0
    assert math.isnan(histogram_quantile(histogram_delta(now, now), 0.99))
    assert math.isnan(histogram_share_within([], 1.0))
