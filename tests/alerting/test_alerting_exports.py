"""The public surface of ``alerting`` and its import hygiene."""

from __future__ import annotations

import subprocess
import sys

import alerting

EXPECTED = {
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
}


def test_all_is_pinned() -> None:
    assert set(alerting.__all__) == EXPECTED
    assert len(alerting.__all__) == len(EXPECTED)
    for name in alerting.__all__:
        assert getattr(alerting, name) is not None, name


def test_errors_subclass_the_builtins_they_resemble() -> None:
    assert issubclass(alerting.AlertingConfigError, ValueError)
    assert issubclass(alerting.InvalidAlertError, ValueError)
    assert issubclass(alerting.DeliveryError, ConnectionError)
    for err in (alerting.AlertingConfigError, alerting.InvalidAlertError, alerting.DeliveryError):
        assert issubclass(err, alerting.AlertingError)


def test_import_pulls_in_no_engine_and_nothing_of_the_project() -> None:
    code = (
        "import sys, alerting, alerting.sinks, alerting.dispatcher\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'vllm', 'onnxruntime', 'deepspeed', 'transformers', 'prometheus_client',"
        " 'detectors', 'sidecar', 'orchestrator', 'adapters', 'muai')]\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
