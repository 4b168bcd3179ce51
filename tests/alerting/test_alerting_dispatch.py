"""Sinks behind the dispatcher, against a real aiohttp webhook receiver started by the test."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging

import pytest
from alerting_helpers import RecordingSink, make_alert
from support.ports import free_port
from support.receiver import WebhookReceiver
from support.waiting import apoll

from alerting import (
    SIGNATURE_HEADER,
    AlertBook,
    AlertingConfigError,
    AlertmanagerSink,
    AlertState,
    Dispatcher,
    LogSink,
    Passthrough,
    Route,
    Throttle,
    WebhookSink,
    verify_signature,
)

FAST = dict(max_attempts=5, backoff_base_s=0.01, backoff_max_s=0.05, drain_timeout_s=2.0)


def quick_throttle(**kw) -> Throttle:
    base = dict(group_wait_s=0.05, group_interval_s=60.0, repeat_interval_s=3600.0, burst=100, rate_per_s=10.0)
    return Throttle(**{**base, **kw})


async def test_webhook_delivers_a_signed_alertmanager_shaped_payload(receiver: WebhookReceiver) -> None:
    book = AlertBook()
    sink = WebhookSink(receiver.url, secret="s3cret", receiver="ops", external_url="http://sidecar:9400")
    async with Dispatcher([Route(sink, policy=quick_throttle())], **FAST) as dispatcher:
        fired = [
            book.observe({"alertname": "HighLatency", "model": "llama", "gpu": gpu}, {"summary": "p95 high"},
                         active=True, now=1_795_750_800.0, value=2.5, threshold=1.0)
            for gpu in ("0", "1")
        ]
        for alert in fired:
            assert alert is not None
            dispatcher.submit(alert)
        await apoll(lambda: dispatcher.stats()["webhook"].sent == 1, what="delivery")
    (req,) = receiver.requests
    assert verify_signature("s3cret", req.body, req.headers[SIGNATURE_HEADER])
    assert not verify_signature("wrong", req.body, req.headers[SIGNATURE_HEADER])
    assert not verify_signature("s3cret", req.body + b" ", req.headers[SIGNATURE_HEADER])
    payload = req.json()
    assert payload["version"] == "4" and payload["status"] == "firing" and payload["receiver"] == "ops"
    assert payload["groupLabels"] == {"alertname": "HighLatency"}
    assert payload["commonLabels"] == {"alertname": "HighLatency", "model": "llama"}
    assert payload["commonAnnotations"] == {"summary": "p95 high", "threshold": "1", "value": "2.5"}
    assert payload["externalURL"] == "http://sidecar:9400"
    assert {a["fingerprint"] for a in payload["alerts"]} == {a.fingerprint for a in fired}
    assert all(a["endsAt"] == "0001-01-01T00:00:00Z" for a in payload["alerts"])
    assert req.headers["Content-Type"] == "application/json"


async def test_unsigned_when_no_secret(receiver: WebhookReceiver) -> None:
    async with Dispatcher([Route(WebhookSink(receiver.url), policy=Passthrough(resend_interval_s=None))], **FAST) as d:
        d.submit(make_alert())
        await apoll(lambda: d.stats()["webhook"].sent == 1)
    assert SIGNATURE_HEADER not in receiver.requests[0].headers


async def test_receiver_failing_for_a_while_gets_the_notification_once(receiver: WebhookReceiver) -> None:
    receiver.fail_first = 3
    sink = WebhookSink(receiver.url, secret=b"k")
    async with Dispatcher([Route(sink, policy=Passthrough(resend_interval_s=None))], **FAST) as d:
        d.submit(make_alert())
        await apoll(lambda: d.stats()["webhook"].sent == 1, what="delivery after 500s")
        stats = d.stats()["webhook"]
    assert [r.status for r in receiver.requests] == [500, 500, 500, 200]
    assert len(receiver.accepted) == 1
    assert len({r.body for r in receiver.requests}) == 1  # the same payload, re-sent
    assert (stats.sent, stats.failed, stats.retries, stats.dropped) == (1, 0, 3, 0)


async def test_a_4xx_is_not_retried(receiver: WebhookReceiver) -> None:
    receiver.fail_first, receiver.fail_status = 100, 400
    async with Dispatcher([Route(WebhookSink(receiver.url), policy=Passthrough(resend_interval_s=None))], **FAST) as d:
        d.submit(make_alert())
        await apoll(lambda: d.stats()["webhook"].failed == 1)
        stats = d.stats()["webhook"]
    assert len(receiver.requests) == 1 and stats.retries == 0
    assert "400" in (stats.last_error or "")


async def test_receiver_down_past_the_buffer_counts_drops_and_never_blocks() -> None:
    down = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens there
    route = Route(WebhookSink(down, timeout_s=1.0), policy=Passthrough(resend_interval_s=None))
    d = Dispatcher([route], buffer_size=4, max_attempts=2, backoff_base_s=0.01, backoff_max_s=0.02)
    await d.start()
    assert not inspect.iscoroutinefunction(d.submit)
    for i in range(50):  # no await in between: the worker cannot take anything off the buffer
        assert d.submit(make_alert(gpu=str(i))) is None
    stats = d.stats()["webhook"]
    assert (stats.queued, stats.dropped) == (4, 46)
    await apoll(lambda: d.stats()["webhook"].failed == 4, what="the buffered four to fail")
    stats = d.stats()["webhook"]
    assert (stats.sent, stats.failed, stats.dropped, stats.retries) == (0, 4, 46, 4)
    assert "ClientConnectorError" in (stats.last_error or "") or "Connect" in (stats.last_error or "")
    await d.aclose()


async def test_a_stuck_receiver_never_delays_another_sink() -> None:
    stuck = await WebhookReceiver(gate=asyncio.Event()).start()
    try:
        recorder = RecordingSink()
        slow = WebhookSink(stuck.url, name="stuck", timeout_s=0.3)
        d = Dispatcher(
            [Route(slow, policy=Passthrough(resend_interval_s=None)), Route(recorder)],
            max_attempts=2, backoff_base_s=0.01, backoff_max_s=0.02,
        )
        async with d:
            for gpu in "01":
                d.submit(make_alert(gpu=gpu))
                await apoll(lambda g=gpu: any(a.labels["gpu"] == g for n in recorder.notifications
                                              for a in n.alerts), what=f"gpu {gpu} delivered")
            assert d.stats()["stuck"].sent == 0
            await apoll(lambda: d.stats()["stuck"].failed >= 1, what="timeouts on the stuck sink")
            assert "TimeoutError" in (d.stats()["stuck"].last_error or "") or "timed out" in (
                d.stats()["stuck"].last_error or "")
    finally:
        stuck.gate.set()
        await stuck.stop()
    assert recorder.closed


async def test_aclose_drains_the_buffer_and_refuses_later_submits() -> None:
    recorder = RecordingSink()
    d = Dispatcher([recorder])
    await d.start()
    d.submit(make_alert())
    await d.aclose()
    assert len(recorder.notifications) == 1 and recorder.closed
    d.submit(make_alert(gpu="7"))
    assert d.stats()["recorder"].dropped == 1
    await d.aclose()  # idempotent


async def test_log_sink_writes_one_json_line_per_notification(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="muai.test.alerts")
    sink = LogSink(logger="muai.test.alerts")
    async with Dispatcher([Route(sink, policy=Passthrough(resend_interval_s=None))]) as d:
        d.submit(make_alert(at=10.0))
        await apoll(lambda: d.stats()["log"].sent == 1)
        d.submit(make_alert(state=AlertState.RESOLVED, at=10.0, ends=20.0))
        await apoll(lambda: d.stats()["log"].sent == 2)
    records = [r for r in caplog.records if r.name == "muai.test.alerts"]
    assert [r.levelno for r in records] == [logging.WARNING, logging.INFO]
    lines = [json.loads(r.getMessage()) for r in records]
    assert [line["status"] for line in lines] == ["firing", "resolved"]
    assert lines[0]["alerts"][0]["labels"]["alertname"] == "HighLatency"
    assert records[0].alert_notification == lines[0]  # type: ignore[attr-defined]


async def test_storm_through_the_dispatcher_stays_within_the_bucket() -> None:
    """300 alerts in 30 groups within a moment: exactly ``burst`` notifications, the rest counted."""
    book = AlertBook()
    recorder = RecordingSink(policy_factory=lambda: quick_throttle(burst=5, rate_per_s=0.001))
    async with Dispatcher([recorder]) as d:
        for name in range(30):
            for gpu in range(10):
                alert = book.observe({"alertname": f"Anomaly{name}", "gpu": gpu}, active=True, now=1000.0)
                assert alert is not None
                d.submit(alert)

        def flushed_once() -> bool:
            s = d.stats()["recorder"]
            return s.sent + s.suppressed.get("rate_limited", 0) >= 30

        await apoll(flushed_once, what="every group's first flush")
        stats = d.stats()["recorder"]
    assert stats.sent == 5 == len(recorder.notifications)
    assert stats.suppressed == {"rate_limited": 25}
    assert all(len(n.alerts) == 10 for n in recorder.notifications)


def test_routes_are_checked() -> None:
    am = AlertmanagerSink("http://127.0.0.1:9093", firing_ttl_s=120)
    assert isinstance(Route(am).policy, Passthrough)
    assert Route(am).policy.resend_interval_s == 30.0
    with pytest.raises(AlertingConfigError, match="firing_ttl_s"):
        Route(am, policy=Throttle())
    with pytest.raises(AlertingConfigError, match="firing_ttl_s"):
        Route(am, policy=Passthrough(resend_interval_s=120))
    with pytest.raises(AlertingConfigError, match="Policy"):
        Route(am, policy=object())  # type: ignore[arg-type]
    with pytest.raises(AlertingConfigError, match="two routes"):
        Dispatcher([RecordingSink(), RecordingSink()])
    with pytest.raises(AlertingConfigError):
        Dispatcher([])
    with pytest.raises(AlertingConfigError):
        Dispatcher([RecordingSink()], buffer_size=0)
    with pytest.raises(AlertingConfigError):
        Dispatcher([RecordingSink()], backoff_base_s=2, backoff_max_s=1)
    with pytest.raises(AlertingConfigError):
        WebhookSink("ftp://example/hook")
    with pytest.raises(AlertingConfigError):
        WebhookSink("http://127.0.0.1/hook", secret="")
    with pytest.raises(AlertingConfigError):
        AlertmanagerSink("http://127.0.0.1:9093", timeout_s=0)


def test_backoff_is_full_jitter_under_an_exponential_cap() -> None:
    import random

    d = Dispatcher([RecordingSink()], backoff_base_s=0.5, backoff_max_s=4.0, rng=random.Random(7))
    for attempt in range(1, 8):
        cap = min(4.0, 0.5 * 2 ** (attempt - 1))
        delays = [d._backoff(attempt, None) for _ in range(200)]
        assert all(0.0 <= x <= cap for x in delays)
        assert max(delays) > cap / 2  # spread over the whole range, not a fixed delay
    assert d._backoff(1, retry_after=3.0) >= 3.0  # the receiver's Retry-After wins
    assert d._backoff(1, retry_after=100.0) <= 4.0  # but never beyond the cap


def test_retry_after_parsing() -> None:
    from alerting.sinks.base import parse_retry_after

    assert parse_retry_after("2.5") == 2.5
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


async def test_a_429_is_retried(receiver: WebhookReceiver) -> None:
    receiver.fail_first, receiver.fail_status = 1, 429
    async with Dispatcher([Route(WebhookSink(receiver.url), policy=Passthrough(resend_interval_s=None))], **FAST) as d:
        d.submit(make_alert())
        await apoll(lambda: d.stats()["webhook"].sent == 1)
    assert [r.status for r in receiver.requests] == [429, 200]


async def test_a_closed_dispatcher_cannot_restart() -> None:
    from alerting import AlertingError

    d = Dispatcher([RecordingSink()])
    await d.aclose()
    with pytest.raises(AlertingError):
        await d.start()


async def test_policies_run_on_the_injected_clock(clock) -> None:
    recorder = RecordingSink(policy_factory=Throttle)  # the default 30 s group_wait
    async with Dispatcher([recorder], clock=clock) as d:
        d.submit(make_alert())
        d.pump()
        assert d.stats()["recorder"].queued == 0
        clock.advance(29.0)
        d.pump()
        assert d.stats()["recorder"].queued == 0
        clock.advance(1.0)
        d.pump()
        await apoll(lambda: len(recorder.notifications) == 1, what="the group after group_wait")


async def test_a_receiver_down_past_the_retries_still_hears_the_alert_fire_before_it_resolves() -> None:
    """Given up after every retry, a notification goes back to its Throttle, which sends the group's state again
    at the next group interval, instead of waiting a repeat interval believing the receiver had it."""
    port = free_port()
    book = AlertBook()
    sink = WebhookSink(f"http://127.0.0.1:{port}/hook", timeout_s=1.0)
    throttle = quick_throttle(group_wait_s=0.0, group_interval_s=0.1, repeat_interval_s=3600.0)
    async with Dispatcher([Route(sink, policy=throttle)], max_attempts=2, backoff_base_s=0.01, backoff_max_s=0.02) as d:
        labels = {"alertname": "HighLatency", "model": "llama"}
        fired = book.observe(labels, active=True, now=1_795_750_800.0)
        assert fired is not None
        d.submit(fired)
        # Nothing listens: the first notification and at least one resend are given up.
        await apoll(lambda: d.stats()["webhook"].failed >= 2, what="two deliveries given up")
        assert throttle.suppressed.get("undelivered", 0) >= 2
        receiver = await WebhookReceiver().start(port)  # the subscriber comes back
        try:
            await apoll(lambda: receiver.alerts("HighLatency"), what="the firing alert once the receiver is up")
            resolved = book.observe(labels, active=False, now=1_795_750_900.0)
            assert resolved is not None
            d.submit(resolved)
            await apoll(lambda: any(s == "resolved" for s, _ in receiver.alerts("HighLatency")), what="the resolution")
            assert [status for status, _ in receiver.alerts("HighLatency")] == ["firing", "resolved"]
        finally:
            await receiver.stop()
