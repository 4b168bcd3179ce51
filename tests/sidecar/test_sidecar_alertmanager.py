"""End to end with a real Alertmanager (Debian ``prometheus-alertmanager`` on 127.0.0.1) and webhook receivers.

Spans with an injected latency anomaly reach the sidecar; its alert shows in Alertmanager's ``/api/v2/alerts``,
Alertmanager delivers it to a webhook receiver, the sidecar's own webhook sink delivers a signed
Alertmanager-shaped payload, and when latency recovers the alert resolves in all of them.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time

import aiohttp
import pytest
from aiohttp import web

from alerting import SIGNATURE_HEADER, verify_signature
from sidecar_helpers import FakeClock, SpanFactory, encode, quiet_config, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

AM_BIN = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
SECRET = "s3cret-for-tests"
PB = {"Content-Type": "application/x-protobuf"}

AM_CONFIG = """\
route:
  receiver: hook
  group_by: ['alertname']
  group_wait: 0s
  group_interval: 1s
  repeat_interval: 1h
receivers:
  - name: hook
    webhook_configs:
      - url: '{url}'
        send_resolved: true
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Receiver:
    """A webhook subscriber: records every JSON payload posted to it, with its headers and raw body."""

    def __init__(self) -> None:
        self.posts: list[tuple[dict, bytes, dict]] = []

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.posts.append((json.loads(body), body, dict(request.headers)))
        return web.Response(text="ok")

    def statuses(self, alertname: str) -> list[str]:
        return [a["status"] for p, _, _ in self.posts for a in p.get("alerts", []) if a["labels"]["alertname"] == alertname]


@pytest.fixture
async def receivers():
    am_hook, own_hook = Receiver(), Receiver()
    app = web.Application()
    app.router.add_post("/am", am_hook.handle)
    app.router.add_post("/own", own_hook.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = _free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}", am_hook, own_hook
    await runner.cleanup()


@pytest.fixture
async def alertmanager(tmp_path, receivers):
    if AM_BIN is None:
        pytest.skip("prometheus-alertmanager is not installed (Debian package prometheus-alertmanager)")
    base, _, _ = receivers
    config = tmp_path / "alertmanager.yml"
    config.write_text(AM_CONFIG.format(url=f"{base}/am"))
    port = _free_port()
    log = (tmp_path / "am.log").open("w")
    proc = subprocess.Popen(
        [AM_BIN, f"--config.file={config}", f"--storage.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="],
        stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:

            async def ready():
                if proc.poll() is not None:
                    pytest.fail(f"alertmanager exited: {(tmp_path / 'am.log').read_text()}")
                try:
                    async with session.get(f"{url}/-/ready") as resp:
                        return resp.status == 200
                except aiohttp.ClientError:
                    return False

            await wait_for(ready, timeout=60, interval=0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


async def _am_alerts(http, url):
    async with http.get(f"{url}/api/v2/alerts", params={"active": "true", "silenced": "false", "inhibited": "false"}) as resp:
        assert resp.status == 200
        return [a for a in await resp.json() if a["labels"].get("alertname") == "HighRequestLatency"]


async def test_latency_anomaly_reaches_alertmanager_and_webhooks_then_resolves(start_sidecar, http, alertmanager, receivers):
    base, am_hook, own_hook = receivers
    # The windows run on a clock the test advances; alert times stay real, since Alertmanager compares
    # endsAt with its own clock.
    clock = FakeClock()
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
    await wait_for(lambda: state.book.counts()["pending"] == 1)
    clock.advance(6)

    (am_alert,) = await wait_for(lambda: _am_alerts(http, alertmanager), timeout=30)
    assert am_alert["labels"] == {"alertname": "HighRequestLatency", "cluster": "test", "model": "llama",
                                  "operation": "chat", "severity": "warning"}
    (ours,) = state.book.firing()
    assert am_alert["fingerprint"] == ours.fingerprint  # the same identity in both
    await wait_for(lambda: "firing" in am_hook.statuses("HighRequestLatency"), timeout=30)
    await wait_for(lambda: "firing" in own_hook.statuses("HighRequestLatency"), timeout=30)
    payload, raw, headers = own_hook.posts[0]
    assert payload["version"] == "4" and payload["status"] == "firing" and payload["alerts"][0]["fingerprint"] == ours.fingerprint
    assert verify_signature(SECRET, raw, headers.get(SIGNATURE_HEADER))

    clock.advance(61)  # the slow minute is over; traffic is fast again
    await post([0.1] * 10)
    await wait_for(lambda: "resolved" in own_hook.statuses("HighRequestLatency"), timeout=30)
    await wait_for(lambda: "resolved" in am_hook.statuses("HighRequestLatency"), timeout=60)
    assert await _am_alerts(http, alertmanager) == []
    async with http.get(server.make_url("/api/v1/alerts")) as resp:
        body = await resp.json()
    assert body["active"] == [] and body["history"][0]["state"] == "resolved"
    assert body["sinks"]["alertmanager"]["sent"] >= 2 and body["sinks"]["webhook"]["failed"] == 0
