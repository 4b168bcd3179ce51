"""Alert sinks: log, webhook (Alertmanager-shaped, signed) and Alertmanager API v2."""

from alerting.sinks.alertmanager import AlertmanagerSink
from alerting.sinks.base import Sink
from alerting.sinks.log import LogSink
from alerting.sinks.webhook import SIGNATURE_HEADER, WebhookSink, sign, verify_signature

__all__ = [
    "Sink",
    "LogSink",
    "WebhookSink",
    "AlertmanagerSink",
    "SIGNATURE_HEADER",
    "sign",
    "verify_signature",
]
