"""Payload rendering: Alertmanager's webhook JSON, the API v2 body, the log record."""

from __future__ import annotations

import re

import pytest
from alerting_helpers import make_alert

from alerting import (
    ZERO_TIME,
    AlertingConfigError,
    AlertState,
    Notification,
    alertmanager_alerts,
    format_time,
    log_record,
    webhook_payload,
)

RFC3339_WITH_ZONE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
T0 = 1_795_750_800.123  # 2026-11-27T03:40:00.123Z


def test_times_are_rfc3339_with_a_zone() -> None:
    assert format_time(T0) == "2026-11-27T03:40:00.123Z"
    assert RFC3339_WITH_ZONE.match(format_time(0.0))
    assert format_time(None) == ZERO_TIME == "0001-01-01T00:00:00Z"


def _note() -> Notification:
    firing = make_alert(gpu="0", model="llama", at=T0)
    resolved = make_alert(gpu="1", model="llama", state=AlertState.RESOLVED, at=T0, ends=T0 + 60)
    return Notification(
        alerts=(firing, resolved),
        group_key='{}:{alertname="HighLatency"}',
        group_labels={"alertname": "HighLatency"},
        created_at=5.0,
    )


def test_webhook_payload_has_alertmanagers_shape() -> None:
    note = _note()
    payload = webhook_payload(note, receiver="ops", external_url="http://sidecar:9400")
    assert set(payload) == {
        "version", "groupKey", "truncatedAlerts", "status", "receiver", "groupLabels",
        "commonLabels", "commonAnnotations", "externalURL", "alerts",
    }
    assert payload["version"] == "4"
    assert payload["status"] == "firing"
    assert payload["receiver"] == "ops"
    assert payload["groupKey"] == note.group_key
    assert payload["truncatedAlerts"] == 0
    assert payload["groupLabels"] == {"alertname": "HighLatency"}
    assert payload["commonLabels"] == {"alertname": "HighLatency", "model": "llama", "severity": "warning"}
    assert payload["commonAnnotations"] == {"summary": "HighLatency is firing"}
    first, second = payload["alerts"]
    assert set(first) == {"status", "labels", "annotations", "startsAt", "endsAt", "generatorURL", "fingerprint"}
    assert first["status"] == "firing" and first["endsAt"] == ZERO_TIME
    assert first["startsAt"] == "2026-11-27T03:40:00.123Z"
    assert first["fingerprint"] == note.alerts[0].fingerprint
    assert second["status"] == "resolved" and second["endsAt"] == "2026-11-27T03:41:00.123Z"


def test_webhook_truncation_keeps_common_labels_over_all_alerts() -> None:
    payload = webhook_payload(_note(), receiver="ops", max_alerts=1)
    assert payload["truncatedAlerts"] == 1 and len(payload["alerts"]) == 1
    assert "gpu" not in payload["commonLabels"]
    with pytest.raises(AlertingConfigError):
        webhook_payload(_note(), receiver="ops", max_alerts=-1)


def test_alertmanager_body_sets_endsat_for_firing_and_resolved() -> None:
    firing, resolved = _note().alerts
    pending = make_alert(state=AlertState.PENDING, at=T0)
    body = alertmanager_alerts([firing, resolved, pending], now=T0 + 10, firing_ttl_s=300)
    assert len(body) == 2
    assert body[0] == {
        "labels": dict(firing.labels),
        "annotations": dict(firing.annotations),
        "startsAt": "2026-11-27T03:40:00.123Z",
        "endsAt": "2026-11-27T03:45:10.123Z",
    }
    assert body[1]["endsAt"] == "2026-11-27T03:41:00.123Z"
    for item in body:
        assert RFC3339_WITH_ZONE.match(item["startsAt"]) and RFC3339_WITH_ZONE.match(item["endsAt"])


def test_log_record_is_compact_and_complete() -> None:
    rec = log_record(_note(), max_alerts=1)
    assert rec["event"] == "alert_notification" and rec["status"] == "firing"
    assert rec["truncated_alerts"] == 1 and rec["alerts"][0]["ends_at"] is None


def test_alertmanager_sink_body_keeps_the_latest_snapshot_per_alert() -> None:
    import json

    from alerting import AlertmanagerSink

    firing = make_alert(gpu="0", at=T0)
    resolved = make_alert(gpu="0", state=AlertState.RESOLVED, at=T0, ends=T0 + 60)
    sink = AlertmanagerSink("http://127.0.0.1:9093/", firing_ttl_s=120, clock=lambda: T0 + 1)
    assert sink.endpoint == "http://127.0.0.1:9093/api/v2/alerts"
    body = json.loads(sink.render([Notification(alerts=(firing,)), Notification(alerts=(resolved,))]))
    assert len(body) == 1 and body[0]["endsAt"] == "2026-11-27T03:41:00.123Z"
    (only_firing,) = json.loads(sink.render([Notification(alerts=(firing,))]))
    assert only_firing["endsAt"] == "2026-11-27T03:42:01.123Z"
