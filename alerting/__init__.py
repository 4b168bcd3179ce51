"""Alerting: the alert model and lifecycle, rate limiting, and sinks (log, webhook, Alertmanager).

Pure cores (:class:`AlertBook`, :class:`Throttle`, :class:`Passthrough`, the ``render`` functions)
take ``now`` and do no I/O; the sinks and the :class:`Dispatcher` are the thin asyncio shell.
Typical wiring::

    book = AlertBook(for_s=0)
    dispatcher = Dispatcher([LogSink(), WebhookSink(url, secret=s), AlertmanagerSink(am_url)])
    await dispatcher.start()
    ...
    transition = book.observe(labels, annotations, state=rule_state, now=time.time())
    if transition is not None:
        dispatcher.submit(transition)

This package imports nothing else of the project.
"""

from alerting.alert import Alert, AlertBook, AlertState, Notification, fingerprint, normalize_labels
from alerting.dispatcher import Dispatcher, Route, SinkStats
from alerting.errors import AlertingConfigError, AlertingError, DeliveryError, InvalidAlertError
from alerting.ratelimit import ALL_LABELS, Passthrough, Policy, Throttle, TokenBucket
from alerting.render import ZERO_TIME, alertmanager_alerts, format_time, log_record, webhook_payload
from alerting.sinks import (
    SIGNATURE_HEADER,
    AlertmanagerSink,
    LogSink,
    Sink,
    WebhookSink,
    sign,
    verify_signature,
)

__all__ = [
    "ALL_LABELS",
    "Alert",
    "AlertBook",
    "AlertState",
    "AlertingConfigError",
    "AlertingError",
    "AlertmanagerSink",
    "DeliveryError",
    "Dispatcher",
    "InvalidAlertError",
    "LogSink",
    "Notification",
    "Passthrough",
    "Policy",
    "Route",
    "SIGNATURE_HEADER",
    "Sink",
    "SinkStats",
    "Throttle",
    "TokenBucket",
    "WebhookSink",
    "ZERO_TIME",
    "alertmanager_alerts",
    "fingerprint",
    "format_time",
    "log_record",
    "normalize_labels",
    "sign",
    "verify_signature",
    "webhook_payload",
]
