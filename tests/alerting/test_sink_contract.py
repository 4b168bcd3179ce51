"""The alert sink contract, run over every sink: log, webhook and Alertmanager, each against the real thing it
writes to (Python's logging, a webhook subscriber on 127.0.0.1, a real ``prometheus-alertmanager``).

What the dispatcher relies on whichever sink it drives: the ``Sink`` shape (``name``, ``max_batch``,
``default_policy()``, ``aclose()`` safe twice where a sink has one: it is optional), every notification of a batch
delivered, resolved alerts delivered as resolved, an empty batch costing nothing, and an unreachable receiver
raising a retryable ``DeliveryError``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from alerting_helpers import make_alert
from support.ports import free_port
from support.procs import ALERTMANAGER, NO_ALERTMANAGER, alertmanager_config, alertmanager_process
from support.receiver import WebhookReceiver
from support.waiting import apoll

from alerting import AlertmanagerSink, AlertState, LogSink, Notification, Sink, WebhookSink
from alerting.errors import DeliveryError

pytestmark = pytest.mark.timeout(120)

SINKS = ["log", "webhook", "alertmanager"]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(record.getMessage()))


class Harness:
    """One sink kind with its real destination: ``make()`` builds a sink writing there, ``state(fp)`` says what
    the destination shows for an alert ("firing", "resolved" or None)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.url = ""
        self.records = _Records()
        self.receiver: WebhookReceiver | None = None
        self._http: aiohttp.ClientSession | None = None
        self._listed: set[str] = set()

    def make(self, *, unreachable: bool = False) -> Any:
        url = f"http://127.0.0.1:{free_port()}" if unreachable else self.url
        if self.kind == "log":
            logger = logging.getLogger(f"muai.alerts.contract.{id(self)}")
            logger.propagate = False
            logger.setLevel(logging.DEBUG)
            if self.records not in logger.handlers:
                logger.addHandler(self.records)
            return LogSink(logger=logger)
        if self.kind == "webhook":
            return WebhookSink(url + ("/hook" if unreachable else ""), secret="s3cret", timeout_s=5.0)
        return AlertmanagerSink(url, timeout_s=5.0, firing_ttl_s=300.0)

    async def state(self, fingerprint: str) -> str | None:
        if self.kind == "log":
            return _last_status(a for line in self.records.lines for a in line["alerts"]
                                if a["fingerprint"] == fingerprint)
        if self.kind == "webhook":
            assert self.receiver is not None
            return _last_status(a for r in self.receiver.accepted for a in r.json()["alerts"]
                                if a["fingerprint"] == fingerprint)
        assert self._http is not None
        async with self._http.get(f"{self.url}/api/v2/alerts") as resp:
            resp.raise_for_status()
            listed = {a["fingerprint"] for a in await resp.json()}
        if fingerprint in listed:
            self._listed.add(fingerprint)
            return "firing"
        # Alertmanager's active list drops an alert once its endsAt has passed: that is how it shows "resolved".
        return "resolved" if fingerprint in self._listed else None


def _last_status(alerts) -> str | None:
    status = None
    for alert in alerts:
        status = alert["status"]
    return status


@asynccontextmanager
async def _harness(kind: str, tmp_path: Path) -> AsyncIterator[Harness]:
    h = Harness(kind)
    if kind == "log":
        yield h
        return
    async with WebhookReceiver() as receiver:
        if kind == "webhook":
            h.receiver, h.url = receiver, receiver.url
            yield h
            return
        if ALERTMANAGER is None:
            pytest.skip(NO_ALERTMANAGER)
        config = tmp_path / "alertmanager.yml"
        config.write_text(yaml.safe_dump(alertmanager_config(receiver.url, group_wait="1s")))
        with alertmanager_process(config, tmp_path) as am:
            await am.await_ready(timeout=30, interval=0.02)
            h.url = am.url
            async with aiohttp.ClientSession() as http:
                h._http = http
                yield h


@pytest.fixture(params=SINKS)
async def harness(request, tmp_path) -> AsyncIterator[Harness]:
    async with _harness(request.param, tmp_path) as h:
        yield h


def _note(*alerts) -> Notification:
    return Notification(alerts=tuple(alerts), group_key="contract", group_labels={"alertname": alerts[0].name})


async def test_the_sink_shape(harness: Harness) -> None:
    sink = harness.make()
    assert isinstance(sink, Sink) and isinstance(sink.name, str) and sink.name
    assert isinstance(sink.max_batch, int) and sink.max_batch >= 1
    assert sink.default_policy() is not None
    await sink.send([])  # an empty batch is no delivery and no error
    await _aclose(sink)
    await _aclose(sink)


async def test_a_firing_alert_then_its_resolution_are_delivered(harness: Harness) -> None:
    sink = harness.make()
    now = time.time()
    firing = make_alert("ContractAlert", at=now, sink=harness.kind)
    try:
        await sink.send([_note(firing)])
        assert await apoll(lambda: _is(harness, firing.fingerprint, "firing"), timeout=20, what="the firing alert")
        resolved = make_alert("ContractAlert", state=AlertState.RESOLVED, at=now, ends=now, sink=harness.kind)
        assert resolved.fingerprint == firing.fingerprint
        await sink.send([_note(resolved)])
        assert await apoll(lambda: _is(harness, firing.fingerprint, "resolved"), timeout=20, what="the resolution")
    finally:
        await _aclose(sink)


async def test_every_notification_of_a_full_batch_is_delivered(harness: Harness) -> None:
    sink = harness.make()
    now = time.time()
    size = min(sink.max_batch, 3)
    alerts = [make_alert(f"ContractBatch{i}", at=now, sink=harness.kind) for i in range(size)]
    try:
        await sink.send([_note(a) for a in alerts])

        async def all_firing() -> bool:
            return all([await _is(harness, a.fingerprint, "firing") for a in alerts])

        assert await apoll(all_firing, timeout=20, what=f"all {size} alerts")
    finally:
        await _aclose(sink)


async def test_an_unreachable_receiver_is_a_retryable_delivery_error(harness: Harness) -> None:
    if harness.kind == "log":
        pytest.skip("the log sink has no receiver to miss: logging never raises into its caller")
    sink = harness.make(unreachable=True)
    try:
        with pytest.raises(DeliveryError) as info:
            await sink.send([_note(make_alert("ContractUnreachable", at=time.time()))])
        assert info.value.retryable
    finally:
        await _aclose(sink)


async def _is(harness: Harness, fingerprint: str, status: str) -> bool:
    return await harness.state(fingerprint) == status


async def _aclose(sink: Any) -> None:
    close = getattr(sink, "aclose", None)  # optional in the Sink protocol
    if close is not None:
        await close()
