"""The MuAI monitoring sidecar: NVML and host collectors, an OTLP/HTTP span receiver, rolling-window
performance statistics with a query API and Prometheus series, anomaly detection and rate-limited alerting.

``muai sidecar`` calls :func:`run` with the ``sidecar`` section of the configuration. Importing this package
never imports torch or an inference engine.
"""

from sidecar.app import SidecarState, create_app, run, serve
from sidecar.collectors import GpuCollector, GpuSample, HostCollector, HostSample
from sidecar.config import DEFAULT_PORT, SidecarConfig
from sidecar.errors import MalformedPayload, OtlpError, PayloadTooLarge, SidecarError, UnsupportedMediaType
from sidecar.evaluation import Evaluator
from sidecar.monitor import PerformanceMonitor, SeriesKey, SeriesStats
from sidecar.otlp import SpanSample, map_request

__all__ = [
    "DEFAULT_PORT",
    "Evaluator",
    "GpuCollector",
    "GpuSample",
    "HostCollector",
    "HostSample",
    "MalformedPayload",
    "OtlpError",
    "PayloadTooLarge",
    "PerformanceMonitor",
    "SeriesKey",
    "SeriesStats",
    "SidecarConfig",
    "SidecarError",
    "SidecarState",
    "SpanSample",
    "UnsupportedMediaType",
    "create_app",
    "map_request",
    "run",
    "serve",
]
