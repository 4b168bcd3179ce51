"""The lean tracer's own sampled span: what reaches the SDK's processors and the OTLP encoder when it ends (names,
ids, parents, times, attributes, events, status), and how the unsampled stand-in leaves the process."""

from __future__ import annotations

import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import SpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode

from orchestrator.config import TracingConfig
from orchestrator.lean_tracer import UNSAMPLED_CONTEXT, UNSAMPLED_SPAN, RecordedSpan
from orchestrator.tracing import build_tracing, extract_context, inject_headers

TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
PARENT_ID = 0x00F067AA0BA902B7


@pytest.fixture
def traced():
    exporter = InMemorySpanExporter()
    tracing = build_tracing(TracingConfig(endpoint="http://127.0.0.1:9/v1/traces", sampling_ratio=1.0,
                                          sampling_budget_per_s=None), exporter=exporter)
    yield tracing, exporter
    tracing.shutdown(1)


def _finished(tracing, exporter):
    tracing.force_flush(5)
    return {s.name: s for s in exporter.get_finished_spans()}


def test_a_sampled_span_ends_as_what_the_sdk_would_have_exported(traced):
    tracing, exporter = traced
    tracer = tracing.tracer
    with tracer.start_as_current_span("root", kind=SpanKind.SERVER, attributes={"a": 1}) as root:
        assert isinstance(root, RecordedSpan) and root.is_recording()
        root.set_attributes({"s": "x", "f": 0.5, "b": True, "seq": ["p", "q"], "none": None, "obj": object(),
                             "mixed": [1, "a"], "empty": ()})
        child = tracer.start_span("child", attributes={"k": "v"})
        child.set_status(Status(StatusCode.ERROR, "boom"))
        child.set_status(StatusCode.UNSET)  # never overrides
        child.record_exception(ValueError("bad value"))
        child.end()
        child.set_attribute("late", 1)  # after end: ignored
        child.end()  # twice: one span
    spans = _finished(tracing, exporter)
    assert set(spans) == {"root", "child"}
    root_span, child_span = spans["root"], spans["child"]
    assert root_span.kind is SpanKind.SERVER and root_span.parent is None
    assert dict(root_span.attributes) == {"a": 1, "s": "x", "f": 0.5, "b": True, "seq": ("p", "q"), "empty": ()}
    assert root_span.start_time <= child_span.start_time <= child_span.end_time <= root_span.end_time
    assert child_span.parent.span_id == root_span.context.span_id
    assert child_span.context.trace_id == root_span.context.trace_id
    assert child_span.context.trace_state == root_span.context.trace_state  # the threshold travels to children
    assert child_span.status.status_code is StatusCode.ERROR and child_span.status.description == "boom"
    assert "late" not in child_span.attributes
    (event,) = child_span.events
    assert event.name == "exception" and event.attributes["exception.type"] == "ValueError"
    assert event.attributes["exception.message"] == "bad value"
    # What the OTLP encoder makes of it round-trips: nothing in it the encoder refuses.
    request = encode_spans(list(exporter.get_finished_spans()))
    assert sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans) == 2


def test_an_exception_leaving_a_current_span_is_recorded_and_ends_it(traced):
    tracing, exporter = traced
    with pytest.raises(RuntimeError):
        with tracing.tracer.start_as_current_span("failing"):
            raise RuntimeError("down")
    (span,) = exporter.get_finished_spans() if tracing.force_flush(5) else ()
    assert span.status.status_code is StatusCode.ERROR
    assert [e.name for e in span.events] == ["exception"]
    assert not trace.get_current_span().get_span_context().is_valid  # detached again


def test_ok_is_final(traced):
    tracing, exporter = traced
    span = tracing.tracer.start_span("s")
    span.set_status(StatusCode.OK)
    span.set_status(Status(StatusCode.ERROR, "later"))
    span.end()
    assert _finished(tracing, exporter)["s"].status.status_code is StatusCode.OK


def test_a_sampled_remote_parent_is_continued_with_its_own_trace_state(traced):
    tracing, exporter = traced
    incoming = extract_context({"traceparent": f"00-{TRACE_ID:032x}-{PARENT_ID:016x}-01", "tracestate": "ot=th:8,v=1"})
    with tracing.tracer.start_as_current_span("server", context=incoming, kind=SpanKind.SERVER):
        pass
    span = _finished(tracing, exporter)["server"]
    assert span.context.trace_id == TRACE_ID and span.parent.span_id == PARENT_ID and span.parent.is_remote
    assert span.context.trace_state.get("ot") == "th:8" and span.context.trace_state.get("v") == "1"


def test_processors_see_each_sampled_span_start_and_end(traced):
    tracing, _ = traced
    seen: list[tuple[str, str]] = []

    class Recording(SpanProcessor):
        def on_start(self, span, parent_context=None):
            seen.append(("start", span.name))

        def on_end(self, span):
            seen.append(("end", span.name))

    tracing.provider.add_span_processor(Recording())
    with tracing.tracer.start_as_current_span("outer"):
        tracing.tracer.start_span("inner").end()
    assert seen == [("start", "outer"), ("start", "inner"), ("end", "inner"), ("end", "outer")]


def test_the_unsampled_stand_in_is_shared_and_leaves_the_process_unsampled_under_fresh_ids():
    tracing = build_tracing(TracingConfig(endpoint="http://127.0.0.1:9/v1/traces", sampling_ratio=0.0,
                                          sampling_budget_per_s=None), exporter=InMemorySpanExporter())
    try:
        with tracing.tracer.start_as_current_span("a", context=extract_context({})) as a:
            assert a is UNSAMPLED_SPAN
            assert trace.get_current_span() is UNSAMPLED_SPAN
            assert tracing.tracer.start_span("inner", context=UNSAMPLED_CONTEXT) is UNSAMPLED_SPAN
            first, second = inject_headers({})["traceparent"], inject_headers({})["traceparent"]
        assert first.endswith("-00") and second.endswith("-00") and first[3:35] != second[3:35]
        # Under a context that carries something of its own, the stand-in is made current inside that context.
        from opentelemetry import baggage

        with tracing.tracer.start_as_current_span("b", context=baggage.set_baggage("k", "v")) as b:
            assert b is UNSAMPLED_SPAN and baggage.get_baggage("k") == "v"
        assert baggage.get_baggage("k") is None
    finally:
        tracing.shutdown(1)
