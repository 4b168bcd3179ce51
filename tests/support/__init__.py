"""Helpers shared by the test folders: real servers started as child processes, recording receivers, polling
with a deadline, free ports and a clock the test advances. Import the modules (``from support.waiting import
apoll``); the names are re-exported here too."""

from support.clock import ManualClock
from support.ports import free_port, free_ports
from support.procs import (
    ALERTMANAGER,
    AMTOOL,
    NO_ALERTMANAGER,
    NO_PROMETHEUS,
    PROMETHEUS,
    PROMTOOL,
    Process,
    alertmanager_config,
    alertmanager_process,
    prometheus_process,
)
from support.receiver import OtlpReceiver, Received, RecordingServer, WebhookReceiver, span_attributes
from support.waiting import apoll, poll

__all__ = [
    "ALERTMANAGER",
    "AMTOOL",
    "NO_ALERTMANAGER",
    "NO_PROMETHEUS",
    "PROMETHEUS",
    "PROMTOOL",
    "ManualClock",
    "OtlpReceiver",
    "Process",
    "Received",
    "RecordingServer",
    "WebhookReceiver",
    "alertmanager_config",
    "alertmanager_process",
    "apoll",
    "free_port",
    "free_ports",
    "poll",
    "prometheus_process",
    "span_attributes",
]
