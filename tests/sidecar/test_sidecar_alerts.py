"""Detectors and alerting wired into the sidecar: an injected latency anomaly fires, then resolves."""

from __future__ import annotations

import math

import numpy as np

from alerting import AlertBook
from sidecar.collectors.gpu import GpuSample
from sidecar.collectors.host import HostSample
from sidecar.config import DetectorsConfig
from sidecar.evaluation import ALERT_ANOMALY, ALERT_ERRORS, ALERT_GPU_MEMORY, ALERT_HOST_MEMORY, ALERT_LATENCY, ALERT_THROUGHPUT, Evaluator
from sidecar.monitor import PerformanceMonitor
from sidecar.otlp import REQUEST, SpanSample
from sidecar_helpers import RecordingSink, SpanFactory, encode, quiet_config
from support.clock import ManualClock
from support.waiting import apoll

PB = {"Content-Type": "application/x-protobuf"}


async def _post(http, server, durations, model="llama"):
    f = SpanFactory()
    for d in durations:
        f.request(d, model=model)
    async with http.post(server.make_url("/v1/traces"), data=encode(f.take()), headers=PB) as resp:
        assert resp.status == 200


async def _active(http, server, alertname, state):
    async with http.get(server.make_url("/api/v1/alerts")) as resp:
        body = await resp.json()
    return [a for a in body["active"] if a["labels"]["alertname"] == alertname and a["state"] == state]


async def test_latency_anomaly_fires_then_resolves(start_sidecar, http):
    clock = ManualClock()
    sink = RecordingSink()
    config = quiet_config(detectors={"window": "1m", "latency": {"threshold_s": 0.5, "for_s": 10, "min_count": 5}})
    server, state = await start_sidecar(config, clock=clock, wall_clock=clock.wall, extra_sinks=[sink])

    await _post(http, server, [0.1] * 20)
    await apoll(lambda: state.evaluator.ticks > 2)
    assert not await _active(http, server, "HighRequestLatency", "pending")

    clock.advance(1)
    await _post(http, server, [2.0] * 20)  # p95 of the minute is now 2 s
    await apoll(lambda: _active(http, server, "HighRequestLatency", "pending"))
    assert not sink.alerts()  # pending is never notified

    clock.advance(11)  # past for_s
    (alert,) = await apoll(lambda: _active(http, server, "HighRequestLatency", "firing"))
    assert alert["labels"] == {"alertname": "HighRequestLatency", "model": "llama", "operation": "chat", "severity": "warning"}
    assert float(alert["annotations"]["value"]) == 2.0 and alert["annotations"]["threshold"] == "0.5"
    await apoll(lambda: sink.alerts("firing"))
    assert sink.alerts("firing")[0].labels["model"] == "llama"

    clock.advance(61)  # the slow minute has passed; fresh traffic is fast again
    await _post(http, server, [0.1] * 20)
    await apoll(lambda: sink.alerts("resolved"))
    async with http.get(server.make_url("/api/v1/alerts")) as resp:
        body = await resp.json()
    assert not body["active"]
    (resolved,) = [a for a in body["history"] if a["labels"]["alertname"] == "HighRequestLatency"]
    assert resolved["state"] == "resolved" and resolved["endsAt"] is not None
    assert body["sinks"]["recording"]["sent"] >= 2

    async with http.get(server.make_url("/metrics")) as resp:
        text = await resp.text()
    assert 'muai_sidecar_alert_transitions_total{state="firing"} 1.0' in text
    assert 'muai_sidecar_notifications_sent_total{sink="recording"}' in text


def _mon():
    return PerformanceMonitor(windows={"10s": 10.0, "1m": 60.0})


def _feed(mon, now, values, error_every=0):
    for i, v in enumerate(values):
        mon.record(SpanSample(REQUEST, "m", "chat", v, bool(error_every) and i % error_every == 0), now)


def _step_alerts(statistical: dict):
    config = DetectorsConfig(window="10s", latency={"enabled": False}, error_rate={"enabled": False},
                             statistical=statistical)
    mon, book = _mon(), AlertBook()
    ev = Evaluator(config, monitor=mon, book=book)
    rng = np.random.default_rng(1)
    t = 0.0
    fired = []
    for step in range(80):
        level = 1.0 if 40 <= step < 50 else 0.1
        _feed(mon, t, list(level + rng.normal(0, 0.002, size=3)))
        fired += ev.tick(t, 1e9 + t)
        t += 1.0
    assert all(s.score >= 0 for s in ev.scores())
    return fired


def test_statistical_detectors_flag_a_step_and_clear_after_recovery():
    # One point per 1 s tick, firing on the first anomalous one (the defaults are 10 s points and for_s=10).
    base = {"interval_s": 1, "for_s": 0, "min_count": 1, "clear_after_s": 5, "ewma": {"warmup": 10},
            # The new-maximum detector (on by default) waits for a day of history: none held back here.
            "novelty": {"recent_s": 0, "min_history_s": 0}}
    for alone in ("ewma", "mad"):
        only = {**base, "ewma": {"warmup": 10, "enabled": alone == "ewma"},
                "mad": {"enabled": alone == "mad", "warmup": 10, "window": 20}}
        fired = _step_alerts(only)
        names = {(a.labels["alertname"], a.labels["detector"], a.status) for a in fired}
        assert (ALERT_ANOMALY, alone, "firing") in names, alone
        assert {a.status for a in fired} == {"firing", "resolved"}
    # Both on: one page for the one step (the second detector's finding is the same incident).
    fired = _step_alerts({**base, "mad": {"enabled": True, "warmup": 10, "window": 20}})
    assert [a.labels["detector"] for a in fired if a.status == "firing"] == ["ewma"]
    assert {a.status for a in fired} == {"firing", "resolved"}


def test_error_rate_throughput_and_memory_rules():
    config = DetectorsConfig(
        window="10s",
        latency={"enabled": False},
        error_rate={"threshold": 0.2, "for_s": 0, "min_count": 5},
        throughput={"threshold_rps": 5.0, "for_s": 0},
        gpu_memory={"threshold_percent": 90, "for_s": 0},
        host_memory={"threshold_percent": 50, "for_s": 0},
        statistical={"ewma": {"enabled": False}, "mad": {"enabled": False}},
    )
    mon, book = _mon(), AlertBook()
    ev = Evaluator(config, monitor=mon, book=book)
    _feed(mon, 0.0, [0.1] * 10, error_every=2)  # 50 % errors, 1 req/s over 10 s
    gpu = GpuSample(index=0, uuid="GPU-x", name="H100", framebuffer_used_bytes=95, framebuffer_total_bytes=100)
    host = HostSample(10.0, 2, 0.1, 100, 60, 40, 60.0, 0, None)
    assert {a.labels["alertname"] for a in ev.tick(1.0, 1e9, gpus=[gpu], host=host)} == {ALERT_ERRORS, ALERT_GPU_MEMORY, ALERT_HOST_MEMORY}
    # The rate rule waits until the series is one window old; then 10 requests in 10 s is 1/s < 5/s.
    _feed(mon, 9.0, [0.1] * 10, error_every=2)
    fired = ev.tick(10.5, 1e9 + 10.5, gpus=[gpu], host=host)
    assert [a.labels["alertname"] for a in fired] == [ALERT_THROUGHPUT]
    # Runtime change: a higher error threshold resolves the error alert on the next tick.
    ev.reconfigure(config.model_copy(update={"error_rate": config.error_rate.model_copy(update={"threshold": 0.9})}))
    gpu_ok = GpuSample(index=0, uuid="GPU-x", name="H100", framebuffer_used_bytes=10, framebuffer_total_bytes=100)
    resolved = {a.labels["alertname"] for a in ev.tick(10.6, 1e9 + 10.6, gpus=[gpu_ok], host=host) if a.status == "resolved"}
    assert resolved == {ALERT_ERRORS, ALERT_GPU_MEMORY}
    assert {a.labels["alertname"] for a in book.firing()} == {ALERT_THROUGHPUT, ALERT_HOST_MEMORY}
    assert ALERT_LATENCY not in {a.labels["alertname"] for a in book.active()}


def test_latency_and_error_alerts_hold_while_too_few_requests_finish():
    """A model so slow that under min_count requests finish per window keeps its alerts (no data is no recovery)."""
    config = DetectorsConfig(
        window="1m",
        latency={"threshold_s": 0.5, "for_s": 5, "min_count": 5},
        error_rate={"threshold": 0.2, "for_s": 0, "min_count": 5},
        statistical={"ewma": {"enabled": False}, "mad": {"enabled": False}},
    )
    mon, book = _mon(), AlertBook()
    ev = Evaluator(config, monitor=mon, book=book)
    transitions = []

    def run(until: float, *, every: float = 0.0, values=(), errors=0) -> None:
        t = run.t
        while t < until:
            t += 1.0
            if every and t % every == 0:
                _feed(mon, t, list(values), error_every=errors)
            transitions.extend(ev.tick(t, 1e9 + t))
        run.t = t

    run.t = 0.0
    _feed(mon, 0.0, [2.0] * 10, error_every=1)  # ten slow failures
    run(10)
    assert {(a.labels["alertname"], a.status) for a in transitions} == {(ALERT_LATENCY, "firing"), (ALERT_ERRORS, "firing")}
    # Then only two slow failures every 30 s: never min_count in a minute. Both alerts stay firing.
    run(300, every=30, values=[2.0, 2.0], errors=1)
    assert [a.status for a in transitions] == ["firing", "firing"]
    assert {a.labels["alertname"] for a in book.firing()} == {ALERT_LATENCY, ALERT_ERRORS}
    # Enough fast, successful requests to judge again: both resolve.
    run(400)
    run(401, every=401, values=[0.1] * 10)
    assert sorted((a.labels["alertname"], a.status) for a in transitions[2:]) == [(ALERT_ERRORS, "resolved"), (ALERT_LATENCY, "resolved")]
    assert not book.firing()


def test_a_detector_turned_off_at_runtime_resolves_its_alert():
    config = DetectorsConfig(
        window="10s",
        latency={"enabled": False},
        error_rate={"enabled": False},
        statistical={"interval_s": 1, "for_s": 0, "min_count": 1, "ewma": {"warmup": 10}, "mad": {"enabled": False}},
    )
    mon, book = _mon(), AlertBook()
    ev = Evaluator(config, monitor=mon, book=book)
    rng = np.random.default_rng(2)
    fired = []
    for step in range(40):
        _feed(mon, float(step), list((3.0 if step >= 30 else 1.0) * rng.lognormal(0, 0.05, size=3)))
        fired += ev.tick(float(step), 1e9 + step)
    assert [(a.labels["detector"], a.status) for a in fired] == [("ewma", "firing")]
    off = config.statistical.model_copy(update={"ewma": config.statistical.ewma.model_copy(update={"enabled": False})})
    ev.reconfigure(config.model_copy(update={"statistical": off}))
    (resolved,) = ev.tick(40.0, 1e9 + 40)
    assert (resolved.labels["detector"], resolved.status) == ("ewma", "resolved")
    assert not book.active()


async def test_each_sink_has_its_own_token_bucket(start_sidecar, http):
    """In a storm the log sink (whose dispatcher is built first) must not take the webhook's tokens."""
    from support.receiver import WebhookReceiver

    async with WebhookReceiver() as hook:
        config = quiet_config(
            detectors={"latency": {"threshold_s": 0.5, "for_s": 0, "min_count": 1}},
            alerting={"sinks": {"log": {"enabled": True}, "webhook": {"url": hook.url}},
                      "rate_limit": {"group_by": ["..."], "burst": 2, "rate_per_s": 0.001}},
        )
        server, state = await start_sidecar(config)
        for i in range(6):  # six models turn slow at once: six alerts, six groups
            await _post(http, server, [2.0] * 3, model=f"m{i}")
        await apoll(lambda: state.book.counts()["firing"] == 6, what="six firing alerts")

        async def sinks():
            async with http.get(server.make_url("/api/v1/alerts")) as resp:
                return (await resp.json())["sinks"]

        body = await apoll(lambda: _both_sent(sinks, 2), what="two notifications through each sink")
        assert body["log"]["suppressed"].get("rate_limited", 0) >= 1
        assert body["webhook"]["suppressed"].get("rate_limited", 0) >= 1
        assert len(hook.accepted) == 2


async def _both_sent(sinks, n):
    body = await sinks()
    return body if body["log"]["sent"] == n and body["webhook"]["sent"] == n else None


def test_an_anomaly_soon_after_one_resolved_does_not_page_again():
    config = DetectorsConfig(statistical={"for_s": 0, "clear_after_s": 5, "repeat_hold_s": 100,
                                          "ewma": {"warmup": 10, "recurring_days": 0}, "novelty": {"enabled": False}})
    ev = Evaluator(config, monitor=_mon(), book=AlertBook())
    rng = np.random.default_rng(2)
    firing = []
    for step in range(300):
        level = 1.0 if 40 <= step < 45 or 70 <= step < 75 or 200 <= step < 205 else 0.1
        for a in ev.judge_point("m", "chat", float(level * np.exp(rng.normal(0, 0.01))), float(step), float(step)):
            if a.status == "firing":
                firing.append(step)
    # The second step comes within 100 s of the first one's alert resolving: the same incident, no second page.
    assert firing == [40, 200]


def test_each_recent_page_raises_the_bar_for_the_next_one():
    # No hold after a resolve here: only the raise stands between the second step and a second page.
    config = DetectorsConfig(statistical={"for_s": 0, "clear_after_s": 5, "repeat_hold_s": 0, "repeat_raise": 1.0,
                                          "repeat_window_s": 1000, "min_rel_spread": 0.01,
                                          "ewma": {"warmup": 30, "recurring_days": 0, "smoothing": 1.0, "z_threshold": 4.0},
                                          "novelty": {"enabled": False}})

    def first_pages(steps):
        ev = Evaluator(config, monitor=_mon(), book=AlertBook())
        rng = np.random.default_rng(3)
        firing = []
        for step in range(1500):
            level = steps.get(step // 10 * 10, 0.1) if step % 100 < 10 else 0.1
            for a in ev.judge_point("m", "chat", float(level * np.exp(rng.normal(0, 0.01))), float(step), float(step)):
                if a.status == "firing":
                    firing.append((step, a.annotations["description"]))
        return firing

    modest, large = 0.1 * math.exp(0.05), 0.1 * math.exp(0.3)  # about 5 and 30 sigmas of the noise
    # The same modest rise twice, 100 s apart: the second is below the raised bar (z x 2) and does not page.
    same = first_pages({100: modest, 200: modest})
    assert [s for s, _ in same] == [100]
    # A much larger rise still pages, and says its threshold was raised; a page a window later counts no more.
    larger = first_pages({100: modest, 200: large, 1300: modest})
    assert [s for s, _ in larger] == [100, 200, 1300]
    assert "raised for 1 page(s)" in larger[1][1] and "raised" not in larger[2][1]
