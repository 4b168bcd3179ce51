"""Our OTLP/HTTP export: the wire encoder against the SDK's own encoder (decoded with opentelemetry-proto), and
the exporter against a real OTLP/HTTP receiver (retries, environment headers, failure)."""

from __future__ import annotations

import asyncio
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as sdk_encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState
from support.receiver import OtlpReceiver

from orchestrator.config import TracingConfig
from orchestrator.otlp_export import OtlpHttpSpanExporter, encode_spans, env_headers
from orchestrator.tracing import build_tracing

pytestmark = pytest.mark.timeout(60)


def _decoded(data: bytes) -> ExportTraceServiceRequest:
    message = ExportTraceServiceRequest.FromString(data)
    # Span.flags: we also write the W3C trace flags into bits 0-7, as trace.proto defines; the SDK's encoder
    # writes only the is-remote bits. Everything else must be the same.
    for resource_spans in message.resource_spans:
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                span.flags &= ~0xFF
                for link in span.links:
                    link.flags &= ~0xFF
    return message


def _same_as_sdk(spans: list[ReadableSpan]) -> None:
    ours = _decoded(encode_spans(spans))
    theirs = _decoded(sdk_encode_spans(spans).SerializeToString())
    assert ours == theirs


def _ctx(trace_id: int, span_id: int, *, remote: bool = False, state: TraceState | None = None) -> SpanContext:
    return SpanContext(trace_id, span_id, is_remote=remote, trace_flags=TraceFlags(1), trace_state=state)


def test_spans_of_every_shape_encode_as_the_sdk_encodes_them():
    resource = Resource.create({"service.name": "muai-orchestrator", "n": 3}, schema_url="https://opentelemetry.io/schemas/1.21.0")
    other = Resource.create({"service.name": "other"})
    scope = InstrumentationScope("muai.orchestrator", "1.2", "https://example.test/schema")
    bare_scope = InstrumentationScope("plain")
    parent = _ctx(0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7, remote=True)
    spans = [
        ReadableSpan("POST /v1/chat/completions", _ctx(1, 2, state=TraceState([("ot", "th:8"), ("v", "1")])), parent,
                     resource, {"s": "é ünïcode", "i": -5, "big": 2**62, "f": 0.25, "b": False, "ss": ("a", "b"),
                                "is": (1, -2), "fs": (0.5,), "bs": (True, False), "empty": ()},
                     (Event("exception", {"exception.type": "ValueError", "n": 1}, 123456789),),
                     (Link(_ctx(7, 8, remote=True), {"why": "batch"}),), SpanKind.SERVER, None,
                     Status(StatusCode.ERROR, "boom"), 1_700_000_000_000_000_000, 1_700_000_000_123_456_789, scope),
        ReadableSpan("text_completion m", _ctx(1, 3), _ctx(1, 2), resource, {"k": "v"}, (), (), SpanKind.INTERNAL,
                     None, Status(StatusCode.OK), 10, 20, scope),
        ReadableSpan("other scope", _ctx(1, 4), None, resource, None, (), (), SpanKind.CLIENT, None,
                     Status(StatusCode.UNSET), 30, 40, bare_scope),
        ReadableSpan("other resource", _ctx(5, 6), None, other, {}, (), (), SpanKind.CONSUMER, None,
                     Status(StatusCode.UNSET), 50, 60, scope),
        ReadableSpan("producer", _ctx(5, 9), None, other, {"k": "v"}, (), (), SpanKind.PRODUCER, None,
                     Status(StatusCode.UNSET), 70, 80, scope),
    ]
    _same_as_sdk(spans)
    # Twice: the second pass comes from the caches of keys, pairs and resources.
    _same_as_sdk(spans)


def test_the_lean_tracer_and_the_sdk_tracer_spans_encode_alike():
    exporter = InMemorySpanExporter()
    tracing = build_tracing(TracingConfig(endpoint="http://127.0.0.1:9/v1/traces", sampling_ratio=1.0,
                                          sampling_budget_per_s=None), exporter=exporter)
    with tracing.tracer.start_as_current_span("root", kind=SpanKind.SERVER) as root:
        root.set_attributes({"gen_ai.request.model": "m", "muai.request": True})
        tracing.tracer.start_span("child", attributes={"gen_ai.usage.output_tokens": 4}).end()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with provider.get_tracer("sdk", "0.1").start_as_current_span("sdk span", attributes={"x": 1.5}) as span:
        span.add_event("e", {"y": "z"})
    tracing.force_flush(5)
    spans = list(exporter.get_finished_spans())
    assert len(spans) == 3
    _same_as_sdk(spans)
    tracing.shutdown(1)


_values = st.one_of(
    st.text(max_size=80), st.booleans(), st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False), st.lists(st.text(max_size=10), max_size=4).map(tuple),
    st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1), max_size=4).map(tuple),
)


@settings(max_examples=200, deadline=None)
@given(attributes=st.dictionaries(st.text(min_size=1, max_size=30), _values, max_size=12),
       name=st.text(max_size=40), start=st.integers(min_value=0, max_value=2**63), trace_id=st.integers(1, 2**128 - 1),
       span_id=st.integers(1, 2**64 - 1))
def test_any_attributes_encode_as_the_sdk_encodes_them(attributes, name, start, trace_id, span_id):
    span = ReadableSpan(name, _ctx(trace_id, span_id), None, Resource.create({}), attributes, (), (), SpanKind.INTERNAL,
                        None, Status(StatusCode.UNSET), start, start, InstrumentationScope("s"))
    _same_as_sdk([span])


def _spans(count: int) -> list[ReadableSpan]:
    return [ReadableSpan(f"s{i}", _ctx(1, i + 1), None, Resource.create({}), {"i": i}, (), (), SpanKind.INTERNAL,
                         None, Status(StatusCode.UNSET), i, i + 1, InstrumentationScope("s")) for i in range(count)]


async def test_the_exporter_delivers_retries_a_busy_receiver_and_sends_the_environment_headers(monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "Authorization=Bearer%20t0k,x-tenant=a")
    async with OtlpReceiver(fail_first=1, fail_status=503) as receiver:
        exporter = OtlpHttpSpanExporter(receiver.endpoint, timeout_s=10)
        result = await asyncio.to_thread(exporter.export, _spans(3))
        assert result is SpanExportResult.SUCCESS
        assert receiver.refused == 1 and [s.name for s in receiver.spans] == ["s0", "s1", "s2"]
        last = receiver.headers[-1]
        assert last["Authorization"] == "Bearer t0k" and last["x-tenant"] == "a"
        assert last["Content-Type"] == "application/x-protobuf"
        exporter.shutdown()
        assert await asyncio.to_thread(exporter.export, _spans(1)) is SpanExportResult.FAILURE


async def test_the_exporter_gives_up_on_a_refusal_at_once_and_on_a_dead_endpoint_by_its_deadline():
    async with OtlpReceiver(fail_first=5, fail_status=400) as receiver:
        exporter = OtlpHttpSpanExporter(receiver.endpoint, timeout_s=10)
        assert await asyncio.to_thread(exporter.export, _spans(1)) is SpanExportResult.FAILURE
        assert receiver.refused == 1  # a 400 is not retried
    started = time.monotonic()
    dead = OtlpHttpSpanExporter(receiver.endpoint, timeout_s=1.5)  # the receiver has stopped: connection refused
    assert await asyncio.to_thread(dead.export, _spans(1)) is SpanExportResult.FAILURE
    assert time.monotonic() - started < 5


async def test_the_exporter_gzips_when_the_environment_asks(monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip")
    async with OtlpReceiver() as receiver:
        exporter = OtlpHttpSpanExporter(receiver.endpoint, timeout_s=10)
        assert await asyncio.to_thread(exporter.export, _spans(2)) is SpanExportResult.SUCCESS
        assert receiver.headers[-1]["Content-Encoding"] == "gzip" and len(receiver.spans) == 2
        exporter.shutdown()


def test_environment_headers_parse_like_the_sdk(monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "a=1, B = two%2C3 ,bad")
    assert env_headers() == {"a": "1", "b": "two,3"}
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "only=this")
    assert env_headers() == {"only": "this"}
