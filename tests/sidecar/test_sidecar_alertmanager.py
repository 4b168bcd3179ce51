"""End to end with a real Alertmanager (Debian ``prometheus-alertmanager`` on 127.0.0.1) and webhook receivers.

Spans with an injected latency anomaly reach the sidecar; its alert shows in Alertmanager's ``/api/v2/alerts``,
Alertmanager delivers it to a webhook receiver, the sidecar's own webhook sink delivers a signed
Alertmanager-shaped payload, and when latency recovers the alert resolves in all of them.
"""

from __future__ import annotations

import time

import pytest
import yaml
from sidecar_helpers import SpanFactory, encode, quiet_config
from support.clock import ManualClock
from support.procs import ALERTMANAGER, NO_ALERTMANAGER, alertmanager_config, alertmanager_process
from support.receiver import RecordingServer, WebhookReceiver
from support.waiting import apoll

from alerting import SIGNATURE_HEADER, verify_signature

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

SECRET = "s3cret-for-tests"
PB = {"Content-Type": "application/x-protobuf"}


@pytest.fixture
async def receivers():
    am_hook, own_hook = WebhookReceiver(), WebhookReceiver()
    async with RecordingServer({"/am": am_hook.handle, "/own": own_hook.handle}) as server:
        yield server.url(), am_hook, own_hook


@pytest.fixture
async def alertmanager(tmp_path, receivers):
    if ALERTMANAGER is None:
        pytest.skip(NO_ALERTMANAGER)
    base, _, _ = receivers
    config = tmp_path / "alertmanager.yml"
    config.write_text(yaml.safe_dump(alertmanager_config(f"{base}/am")))
    with alertmanager_process(config, tmp_path) as am:
        await am.await_ready(timeout=60, interval=0.1)
        yield am.url


def _statuses(hook: WebhookReceiver, alertname: str) -> list[str]:
    return [status for status, _ in hook.alerts(alertname)]


async def _am_alerts(http, url):
    async with http.get(f"{url}/api/v2/alerts", params={"active": "true", "silenced": "false", "inhibited": "false"}) as resp:
        assert resp.status == 200
        return [a for a in await resp.json() if a["labels"].get("alertname") == "HighRequestLatency"]


async def test_latency_anomaly_reaches_alertmanager_and_webhooks_then_resolves(start_sidecar, http, alertmanager, receivers):
    base, am_hook, own_hook = receivers
    # The windows run on a clock the test advances; alert times stay real, since Alertmanager compares
    # endsAt with its own clock.
    clock = ManualClock()
    config = quiet_config(
        detectors={"window": "1m", "latency": {"threshold_s": 0.5, "for_s": 5, "min_count": 5}},
        alerting={
            "external_labels": {"cluster": "test"},
            "sinks": {
                "alertmanager": {"url": alertmanager, "resend_interval_s": 2, "retries": 2},
                "webhook": {"url": f"{base}/own", "secret": SECRET, "retries": 2},
            },
        },
    )
    server, state = await start_sidecar(config, clock=clock, wall_clock=time.time)

    async def post(durations):
        f = SpanFactory()
        for d in durations:
            f.request(d, model="llama")
        async with http.post(server.make_url("/v1/traces"), data=encode(f.take()), headers=PB) as resp:
            assert resp.status == 200

    await post([0.1] * 10)
    clock.advance(1)
    await post([3.0] * 30)  # the injected anomaly
    await apoll(lambda: state.book.counts()["pending"] == 1)
    clock.advance(6)

    (am_alert,) = await apoll(lambda: _am_alerts(http, alertmanager), timeout=30)
    assert am_alert["labels"] == {"alertname": "HighRequestLatency", "cluster": "test", "model": "llama",
                                  "operation": "chat", "severity": "warning"}
    (ours,) = state.book.firing()
    assert am_alert["fingerprint"] == ours.fingerprint  # the same identity in both
    await apoll(lambda: "firing" in _statuses(am_hook, "HighRequestLatency"), timeout=30)
    await apoll(lambda: "firing" in _statuses(own_hook, "HighRequestLatency"), timeout=30)
    first = own_hook.requests[0]
    payload, raw, headers = first.json(), first.body, first.headers
    assert payload["version"] == "4" and payload["status"] == "firing" and payload["alerts"][0]["fingerprint"] == ours.fingerprint
    assert verify_signature(SECRET, raw, headers.get(SIGNATURE_HEADER))

    clock.advance(61)  # the slow minute is over; traffic is fast again
    await post([0.1] * 10)
    await apoll(lambda: "resolved" in _statuses(own_hook, "HighRequestLatency"), timeout=30)
    await apoll(lambda: "resolved" in _statuses(am_hook, "HighRequestLatency"), timeout=60)
    assert await _am_alerts(http, alertmanager) == []
    async with http.get(server.make_url("/api/v1/alerts")) as resp:
        body = await resp.json()
    assert body["active"] == [] and body["history"][0]["state"] == "resolved"
    assert body["sinks"]["alertmanager"]["sent"] >= 2 and body["sinks"]["webhook"]["failed"] == 0
