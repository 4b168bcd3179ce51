"""What one sidecar app owns (:class:`SidecarState`), kept on the app under :data:`STATE`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from alerting import (
    AlertBook,
    Dispatcher,
)
from sidecar.collectors.gpu import GpuCollector, GpuSample
from sidecar.collectors.host import HostCollector, HostSample
from sidecar.config import DetectorsConfig, SidecarConfig
from sidecar.evaluation import Evaluator
from sidecar.forwarding import Forwarder
from sidecar.gpu_faults import GpuFault, GpuFaultWatch, alert_of
from sidecar.metrics import SidecarMetrics
from sidecar.monitor import PerformanceMonitor
from sidecar.otlp import INFERENCE, REQUEST, MappedBatch, map_request
from sidecar.tuner import Tuner

if TYPE_CHECKING:  # the receiver module reaches back here for ingest()
    from sidecar.otlp_grpc import GrpcReceiver


@dataclasses.dataclass(eq=False)
class SidecarState:
    """Everything one sidecar app owns. Only the event loop's thread touches it."""

    config: SidecarConfig
    clock: Callable[[], float]
    wall_clock: Callable[[], float]
    monitor: PerformanceMonitor
    registry: CollectorRegistry
    gpu: GpuCollector | None
    host: HostCollector | None
    forwarder: Forwarder | None
    book: AlertBook
    evaluator: Evaluator | None
    dispatchers: list[Dispatcher]
    metrics: SidecarMetrics | None = None
    gpu_samples: list[GpuSample] = dataclasses.field(default_factory=list)
    host_sample: HostSample | None = None
    gpu_sampled_at: float | None = None
    host_sampled_at: float | None = None
    started_at: float = 0.0
    loop_errors: dict[str, str] = dataclasses.field(default_factory=dict)
    tuner: Tuner | None = None
    otlp_grpc: GrpcReceiver | None = None
    gpu_watch: GpuFaultWatch = dataclasses.field(default_factory=GpuFaultWatch)
    pending_cordons: list[GpuFault] = dataclasses.field(default_factory=list)
    """GPU faults the evaluation loop has yet to ask the orchestrator to cordon."""

    def reconfigure_detectors(self, detectors: DetectorsConfig) -> None:
        """Apply runtime changes of the ``detectors`` section (thresholds, ``for`` durations, detector parameters)."""
        if self.evaluator is not None:
            self.evaluator.reconfigure(detectors)

    def evaluate(self) -> int:
        """Run one evaluation tick now and hand its transitions to the dispatchers; returns how many. A fatal GPU
        fault in the latest samples raises ``GpuFatalFault`` and queues the GPU's cordon (``pending_cordons``)."""
        if self.evaluator is None:
            return 0
        transitions = self.evaluator.tick(
            self.clock(), self.wall_clock(), gpus=self.gpu_samples, host=self.host_sample
        )
        for fault in self.gpu_watch.update(self.gpu_samples):
            labels, annotations = alert_of(fault)
            transition = self.book.observe(labels, annotations, now=self.wall_clock(), active=True)
            if transition is not None:
                transitions.append(transition)
            self.pending_cordons.append(fault)
        for alert in transitions:
            for dispatcher in self.dispatchers:
                dispatcher.submit(alert)
        return len(transitions)


STATE: web.AppKey[SidecarState] = web.AppKey("muai_sidecar_state", SidecarState)


def ingest(state: SidecarState, message: Any, raw: bytes, encoding: str) -> MappedBatch:
    """One decoded export request into the statistics, the counters and the forwarder, whichever transport brought
    it (OTLP/HTTP or gRPC): the same mapping and the same bookkeeping for both."""
    metrics = state.metrics
    mapped = map_request(message)
    tracked = state.monitor.record_many(mapped.samples, state.clock())
    requests = sum(1 for s in mapped.samples if s.scope == REQUEST)
    if requests:
        metrics.samples[REQUEST].inc(requests)
    if len(mapped.samples) - requests:
        metrics.samples[INFERENCE].inc(len(mapped.samples) - requests)
    if tracked < len(mapped.samples):
        metrics.samples_untracked.inc(len(mapped.samples) - tracked)
    metrics.spans_received.inc(mapped.spans)
    if mapped.rejected:
        metrics.spans_rejected.inc(mapped.rejected)
    if state.forwarder is not None and mapped.spans:
        state.forwarder.submit(raw)
    metrics.export(encoding, 200)
    return mapped


__all__ = ["STATE", "SidecarState", "ingest"]
