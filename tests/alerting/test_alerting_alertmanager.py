"""Integration with a real Alertmanager (Debian ``prometheus-alertmanager``) on 127.0.0.1.

Our sink posts to its API v2; Alertmanager groups the alert and delivers it to a webhook receiver
started by the test; resolving it clears it in both places. Alertmanager's own webhook payload is
also the reference our webhook sink's payload is checked against.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from support.procs import ALERTMANAGER, AMTOOL, NO_ALERTMANAGER, alertmanager_config, alertmanager_process
from support.receiver import WebhookReceiver
from support.waiting import apoll

from alerting import AlertBook, AlertmanagerSink, Dispatcher, Notification, Route, webhook_payload

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


async def _get_json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as resp:
        resp.raise_for_status()
        return await resp.json()


@pytest.fixture
async def alertmanager(tmp_path: Path, receiver: WebhookReceiver) -> AsyncIterator[str]:
    if ALERTMANAGER is None:
        pytest.skip(NO_ALERTMANAGER)
    config = tmp_path / "alertmanager.yml"
    config.write_text(yaml.safe_dump(alertmanager_config(receiver.url, group_wait="1s")))
    if AMTOOL is not None:
        check = subprocess.run([AMTOOL, "check-config", str(config)], capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr
    with alertmanager_process(config, tmp_path) as am:
        await am.await_ready(timeout=30, interval=0.02)
        yield am.url


def test_amtool_is_present_with_the_server() -> None:
    if ALERTMANAGER is None:
        pytest.skip("prometheus-alertmanager is not installed")
    assert AMTOOL is not None, "amtool ships with prometheus-alertmanager"


async def test_alert_fires_and_resolves_in_alertmanager_and_at_its_receiver(
    alertmanager: str, receiver: WebhookReceiver
) -> None:
    book = AlertBook(generator_url="http://127.0.0.1:9400/api/v1/alerts")
    sink = AlertmanagerSink(alertmanager, firing_ttl_s=4.0)  # re-posted every second
    labels = {"alertname": "MuaiLatencyAnomaly", "model": "tiny-llama", "severity": "warning"}
    async with Dispatcher([Route(sink)], max_attempts=3, backoff_base_s=0.05, backoff_max_s=0.2) as d, \
            aiohttp.ClientSession() as http:

        async def am_alerts() -> list[dict[str, Any]]:
            return await _get_json(http, f"{alertmanager}/api/v2/alerts")

        def poll(probe, what: str) -> Any:
            return apoll(probe, what=what, timeout=20.0)

        fired = book.observe(labels, {"summary": "p95 latency of tiny-llama is anomalous"}, active=True,
                             now=time.time(), value=1.8, threshold=0.5)
        assert fired is not None
        d.submit(fired)

        async def listed() -> dict[str, Any] | None:
            return next((a for a in await am_alerts() if a["labels"].get("alertname") == labels["alertname"]), None)

        shown = await poll(listed, "the alert in GET /api/v2/alerts")
        # Our fingerprint is Alertmanager's own, so several sidecars dedup there.
        assert shown["fingerprint"] == fired.fingerprint
        assert shown["status"]["state"] == "active"
        assert shown["labels"] == dict(fired.labels)
        assert shown["annotations"]["value"] == "1.8"
        assert shown["generatorURL"] == fired.generator_url
        first_ends = shown["endsAt"]

        async def delivered(status: str):
            return next((r.json() for r in receiver.accepted if r.json()["status"] == status), None)

        am_firing = await poll(lambda: delivered("firing"), "Alertmanager's firing webhook")
        assert [a["fingerprint"] for a in am_firing["alerts"]] == [fired.fingerprint]
        assert am_firing["version"] == "4" and am_firing["groupLabels"] == {"alertname": labels["alertname"]}

        # Our own webhook payload has exactly Alertmanager's shape.
        ours = webhook_payload(Notification(alerts=(fired,), group_key="k", group_labels={}), receiver="hook")
        assert set(ours) == set(am_firing)
        assert set(ours["alerts"][0]) == set(am_firing["alerts"][0])

        async def reposted() -> bool:
            alert = await listed()
            return alert is not None and alert["endsAt"] != first_ends

        await poll(reposted, "a re-post that moves endsAt forward")

        resolved = book.observe(labels, active=False, now=time.time())
        assert resolved is not None
        d.submit(resolved)

        async def gone() -> bool:
            return await listed() is None

        await poll(gone, "the alert to leave Alertmanager's active list")
        am_resolved = await poll(lambda: delivered("resolved"), "Alertmanager's resolved webhook")
        assert [a["fingerprint"] for a in am_resolved["alerts"]] == [fired.fingerprint]
        assert am_resolved["alerts"][0]["endsAt"] != "0001-01-01T00:00:00Z"
        stats = d.stats()["alertmanager"]
    assert stats.failed == 0 and stats.dropped == 0 and stats.sent >= 3
