"""Payloads as Alertmanager writes and reads them: pure functions, ``now`` passed in.

* :func:`webhook_payload`: the JSON Alertmanager's own webhook receiver sends (version "4"), so a
  subscriber written for Alertmanager reads ours unchanged.
* :func:`alertmanager_alerts`: the body of Alertmanager API v2 ``POST /api/v2/alerts``.
* :func:`log_record`: the structured line the log sink writes.

Times are RFC 3339 with a zone (``2026-11-27T03:40:00.123Z``); an unset ``endsAt`` in a webhook is
Go's zero time, ``0001-01-01T00:00:00Z``, as Alertmanager writes it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from alerting._time import ZERO_TIME, format_time
from alerting.alert import Alert, AlertState, Notification
from alerting.errors import AlertingConfigError

__all__ = [
    "ZERO_TIME",
    "format_time",
    "common_items",
    "webhook_payload",
    "alertmanager_alerts",
    "log_record",
]


def common_items(maps: Iterable[Mapping[str, str]]) -> dict[str, str]:
    """The name/value pairs every mapping shares (Alertmanager's ``commonLabels`` rule)."""
    it = iter(maps)
    first = next(it, None)
    if first is None:
        return {}
    common = dict(first)
    for m in it:
        for k in [k for k, v in common.items() if m.get(k) != v]:
            del common[k]
        if not common:
            break
    return dict(sorted(common.items()))


def _webhook_alert(alert: Alert) -> dict[str, Any]:
    return {
        "status": alert.status,
        "labels": dict(alert.labels),
        "annotations": dict(alert.annotations),
        "startsAt": format_time(alert.starts_at),
        "endsAt": format_time(alert.ends_at if alert.state is AlertState.RESOLVED else None),
        "generatorURL": alert.generator_url,
        "fingerprint": alert.fingerprint,
    }


def webhook_payload(
    notification: Notification,
    *,
    receiver: str,
    external_url: str = "",
    max_alerts: int = 0,
) -> dict[str, Any]:
    """Alertmanager's webhook JSON for one notification.

    ``max_alerts`` > 0 keeps only that many alerts and reports the rest in ``truncatedAlerts``;
    common labels and annotations are computed over all alerts, as Alertmanager does.
    """
    if max_alerts < 0:
        raise AlertingConfigError(f"max_alerts must be >= 0, got {max_alerts!r}")
    alerts = notification.alerts
    shown = alerts if max_alerts == 0 else alerts[:max_alerts]
    return {
        "version": "4",
        "groupKey": notification.group_key,
        "truncatedAlerts": len(alerts) - len(shown),
        "status": notification.status,
        "receiver": receiver,
        "groupLabels": dict(notification.group_labels),
        "commonLabels": common_items(a.labels for a in alerts),
        "commonAnnotations": common_items(a.annotations for a in alerts),
        "externalURL": external_url,
        "alerts": [_webhook_alert(a) for a in shown],
    }


def alertmanager_alerts(
    alerts: Iterable[Alert], *, now: float, firing_ttl_s: float
) -> list[dict[str, Any]]:
    """The body of ``POST /api/v2/alerts``.

    A firing alert gets ``endsAt = now + firing_ttl_s``: Alertmanager resolves it by itself if we
    go quiet (we crashed, the network split), so firing alerts must be re-posted before then. A
    resolved alert gets its real ``endsAt``. ``generatorURL`` is left out when empty because
    Alertmanager validates it as a URI.
    """
    body: list[dict[str, Any]] = []
    for alert in alerts:
        if alert.state is AlertState.PENDING:
            continue
        ends = alert.ends_at if alert.state is AlertState.RESOLVED else now + firing_ttl_s
        item: dict[str, Any] = {
            "labels": dict(alert.labels),
            "annotations": dict(alert.annotations),
            "startsAt": format_time(alert.starts_at),
            "endsAt": format_time(ends),
        }
        if alert.generator_url:
            item["generatorURL"] = alert.generator_url
        body.append(item)
    return body


def log_record(notification: Notification, *, max_alerts: int = 0) -> dict[str, Any]:
    """The structured record of one notification, for a JSON log line."""
    alerts = notification.alerts
    shown = alerts if max_alerts <= 0 else alerts[:max_alerts]
    return {
        "event": "alert_notification",
        "status": notification.status,
        "group_key": notification.group_key,
        "group_labels": dict(notification.group_labels),
        "truncated_alerts": len(alerts) - len(shown),
        "alerts": [
            {
                "fingerprint": a.fingerprint,
                "status": a.status,
                "labels": dict(a.labels),
                "annotations": dict(a.annotations),
                "starts_at": format_time(a.starts_at),
                "ends_at": None if a.ends_at is None else format_time(a.ends_at),
            }
            for a in shown
        ],
    }
