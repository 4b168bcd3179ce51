"""Span batches made by the real OpenTelemetry SDK and its real OTLP encoder (shared by tests and bench)."""

from __future__ import annotations

import base64

from google.protobuf import json_format
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode

from sidecar.config import SidecarConfig

T0 = 1_700_000_000_000_000_000


class SpanFactory:
    """Finished SDK spans with exact durations, encoded by the SDK's own OTLP encoder."""

    def __init__(self, service: str = "muai-orchestrator") -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider(resource=Resource.create({"service.name": service}))
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer = self.provider.get_tracer("tests.sidecar")

    def request(
        self,
        duration_s: float,
        *,
        model: str = "m",
        operation: str = "chat",
        error: bool = False,
        kind: SpanKind = SpanKind.SERVER,
        attributes: dict | None = None,
        name: str | None = None,
        parent=None,
    ):
        attrs = {"gen_ai.operation.name": operation, "gen_ai.request.model": model, **(attributes or {})}
        if error:
            attrs["error.type"] = "EngineError"
        span = self.tracer.start_span(
            name or f"{operation} {model}", kind=kind, attributes=attrs, start_time=T0, context=parent
        )
        if error:
            span.set_status(Status(StatusCode.ERROR, "boom"))
        span.end(end_time=T0 + int(round(duration_s * 1e9)))
        return span

    def vllm(self, e2e_s: float, *, ttft_s: float = 0.01, prompt: int = 3, completion: int = 7):
        span = self.tracer.start_span(
            "llm_request",
            kind=SpanKind.SERVER,
            start_time=T0,
            attributes={
                "gen_ai.latency.e2e": e2e_s,
                "gen_ai.latency.time_to_first_token": ttft_s,
                "gen_ai.usage.prompt_tokens": prompt,
                "gen_ai.usage.completion_tokens": completion,
            },
        )
        span.end(end_time=T0 + 5)
        return span

    def take(self):
        spans = list(self.exporter.get_finished_spans())
        self.exporter.clear()
        return spans


def encode(spans) -> bytes:
    return encode_spans(spans).SerializeToString()


def to_otlp_json(spans) -> dict:
    """OTLP/JSON as the spec writes it: camelCase, hex trace and span ids."""
    doc = json_format.MessageToDict(encode_spans(spans))
    for rs in doc.get("resourceSpans", ()):
        for ss in rs.get("scopeSpans", ()):
            for span in ss.get("spans", ()):
                for key in ("traceId", "spanId", "parentSpanId"):
                    if span.get(key):
                        span[key] = base64.b64decode(span[key]).hex()
    return doc


class RecordingSink:
    """An alert sink that keeps every notification it is sent (a real implementation of alerting's Sink)."""

    name = "recording"
    max_batch = 64

    def __init__(self) -> None:
        self.notifications = []

    async def send(self, notifications) -> None:
        self.notifications.extend(notifications)

    def alerts(self, status: str | None = None):
        return [a for n in self.notifications for a in n.alerts if status is None or a.status == status]


def quiet_config(**overrides) -> SidecarConfig:
    """Defaults suited to tests: fast ticks, no statistical detectors unless asked, log sink off."""
    base = {
        # Tests never bind the standard 4317 (another sidecar or collector may hold it); gRPC tests pass port 0.
        "otlp_grpc_port": None,
        "collectors": {"interval_s": 0.05},
        "detectors": {"interval_s": 0.02, "statistical": {"ewma": {"enabled": False}, "mad": {"enabled": False}}},
        "alerting": {"sinks": {"log": {"enabled": False}},
                     "rate_limit": {"group_wait_s": 0, "group_interval_s": 0.05, "repeat_interval_s": 3600, "rate_per_s": 100, "burst": 100}},
    }
    return SidecarConfig(**_merge(base, overrides))


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
