"""OTLP payload decoding and the span -> sample mapping (pure functions)."""

from __future__ import annotations

import gzip
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry import trace
from opentelemetry.trace import SpanKind
from sidecar_helpers import SpanFactory, encode, to_otlp_json

from sidecar.errors import MalformedPayload, PayloadTooLarge, UnsupportedMediaType
from sidecar.otlp import (
    INFERENCE,
    JSON,
    PROTOBUF,
    REQUEST,
    decode_request,
    decompress,
    encode_response,
    map_request,
    media_kind,
)


def _samples(spans):
    request, _ = decode_request(encode(spans), PROTOBUF)
    return map_request(request)


def test_request_and_inference_spans_follow_the_documented_rule():
    f = SpanFactory()
    root = f.request(0.5, model="m", operation="chat", kind=SpanKind.SERVER)
    ctx = trace.set_span_in_context(root)
    f.request(0.3, model="m", operation="chat", kind=SpanKind.CLIENT, parent=ctx)  # inference below the root
    f.request(0.2, model="e", operation="embeddings", kind=SpanKind.INTERNAL)  # root without a parent: request
    f.request(0.1, model="x", operation="chat", kind=SpanKind.INTERNAL, parent=ctx, attributes={"muai.request": True})
    f.request(0.1, model="y", operation="chat", kind=SpanKind.SERVER, attributes={"muai.request": False})
    plain = f.tracer.start_span("GET /health", start_time=1, kind=SpanKind.SERVER)
    plain.end(end_time=2)
    mapped = _samples(f.take())
    assert mapped.spans == 6 and mapped.rejected == 0
    got = [(s.scope, s.model, s.operation, round(s.duration_s, 9)) for s in mapped.samples]
    assert got == [
        (REQUEST, "m", "chat", 0.5),
        (INFERENCE, "m", "chat", 0.3),
        (REQUEST, "e", "embeddings", 0.2),
        (REQUEST, "x", "chat", 0.1),
        (INFERENCE, "y", "chat", 0.1),
    ]


def test_errors_tokens_and_engine():
    f = SpanFactory()
    f.request(1.0, error=True, attributes={"gen_ai.usage.input_tokens": 12, "gen_ai.usage.output_tokens": 34, "muai.engine": "torch"})
    f.request(1.0, attributes={"error.type": "timeout"})
    f.request(1.0)
    s = _samples(f.take()).samples
    assert [x.error for x in s] == [True, True, False]
    assert (s[0].input_tokens, s[0].output_tokens, s[0].engine) == (12, 34, "torch")
    assert s[2].input_tokens is None


def test_odd_attribute_values_count_as_absent():
    f = SpanFactory()
    f.request(1.0, attributes={"gen_ai.usage.input_tokens": float("inf"), "gen_ai.usage.output_tokens": "many",
                               "gen_ai.latency.e2e": float("nan"), "gen_ai.latency.time_to_first_token": True})
    (s,) = _samples(f.take()).samples
    assert (s.input_tokens, s.output_tokens, s.ttft_s, s.duration_s) == (None, None, None, 1.0)


def test_vllm_llm_request_maps_to_the_same_statistics():
    f = SpanFactory(service="vllm-llama")
    f.vllm(2.5, ttft_s=0.125, prompt=5, completion=9)
    (s,) = _samples(f.take()).samples
    assert s.scope == REQUEST and s.operation == "text_completion"
    assert s.model == "vllm-llama"  # vLLM names no model on the span: the resource's service.name stands in
    assert s.duration_s == 2.5  # gen_ai.latency.e2e wins over the span's own timing
    assert (s.ttft_s, s.input_tokens, s.output_tokens) == (0.125, 5, 9)


def test_invalid_spans_are_rejected_as_partial_success():
    f = SpanFactory()
    f.request(0.1)
    request, _ = decode_request(encode(f.take()), PROTOBUF)
    span = request.resource_spans[0].scope_spans[0].spans[0]
    bad = request.resource_spans[0].scope_spans[0].spans.add()
    bad.CopyFrom(span)
    bad.end_time_unix_nano = bad.start_time_unix_nano - 1
    bad2 = request.resource_spans[0].scope_spans[0].spans.add()
    bad2.CopyFrom(span)
    bad2.trace_id = b"short"
    mapped = map_request(request)
    assert (mapped.spans, mapped.rejected, len(mapped.samples)) == (3, 2, 1)
    assert mapped.error_message
    body = json.loads(encode_response(JSON, rejected=2, error_message=mapped.error_message))
    assert body["partialSuccess"]["rejectedSpans"] == "2"


def test_json_encoding_matches_protobuf():
    f = SpanFactory()
    root = f.request(0.25)
    f.request(0.125, kind=SpanKind.CLIENT, parent=trace.set_span_in_context(root))
    spans = f.take()
    from_pb, raw_pb = decode_request(encode(spans), PROTOBUF)
    from_json, raw_json = decode_request(json.dumps(to_otlp_json(spans)).encode(), JSON)
    assert from_json == from_pb
    assert raw_json == from_pb.SerializeToString()
    assert [s.scope for s in map_request(from_json).samples] == [REQUEST, INFERENCE]


@pytest.mark.parametrize(
    "body",
    [b"{", b"[]", b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "zz"}]}]}]}',
     b'{"resourceSpans": "nope"}', b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"spanId": 5}]}]}]}', b"\xff\xfe"],
)
def test_malformed_json_is_refused(body):
    with pytest.raises(MalformedPayload):
        decode_request(body, JSON)


def test_content_types():
    assert media_kind("application/x-protobuf") == PROTOBUF
    assert media_kind("application/json; charset=utf-8") == JSON
    for bad in (None, "", "text/plain", "application/grpc"):
        with pytest.raises(UnsupportedMediaType):
            media_kind(bad)


def test_gzip_limits():
    data = b"x" * 10_000
    assert decompress(gzip.compress(data), "gzip", limit=10_000) == data
    with pytest.raises(PayloadTooLarge):
        decompress(gzip.compress(data), "gzip", limit=9_999)
    with pytest.raises(MalformedPayload):
        decompress(gzip.compress(data)[:-10], "gzip", limit=20_000)
    with pytest.raises(MalformedPayload):
        decompress(b"not gzip", "gzip", limit=20_000)
    with pytest.raises(UnsupportedMediaType):
        decompress(data, "br", limit=20_000)
    assert decompress(data, None, limit=1) == data  # the identity limit is the body limit, checked by the reader


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2048))
def test_random_bytes_either_decode_or_raise_malformed(body):
    try:
        request, _ = decode_request(body, PROTOBUF)
    except MalformedPayload:
        return
    map_request(request)  # whatever parsed must map without raising


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=1, max_value=10_000))
def test_truncated_protobuf_never_escapes_as_another_error(cut):
    f = SpanFactory()
    for i in range(5):
        f.request(0.1 * (i + 1), attributes={"gen_ai.usage.input_tokens": i})
    body = encode(f.take())
    try:
        request, _ = decode_request(body[: min(cut, len(body) - 1)], PROTOBUF)
    except MalformedPayload:
        return
    map_request(request)


@pytest.mark.parametrize("opener,closer", [(b"[", b"]"), (b'{"a":', b"}")])
def test_json_nested_past_the_decoders_limit_is_malformed_not_a_crash(opener, closer):
    """A body nested tens of thousands deep made json.loads raise RecursionError, which the receiver answered 500."""
    body = opener * 50_000 + b"1" + closer * 50_000
    with pytest.raises(MalformedPayload, match="nested deeper than 200 levels"):
        decode_request(body, "json")


def _nested_attribute(depth: int) -> dict:
    value: dict = {"stringValue": "leaf"}
    for _ in range(depth):
        value = {"kvlistValue": {"values": [{"key": "k", "value": value}]}}
    return value


@pytest.mark.parametrize("depth", [5, 30])
def test_attributes_nested_within_the_bound_decode_from_json_and_protobuf(depth):
    span = {"traceId": "ab" * 16, "spanId": "cd" * 8, "name": "x", "startTimeUnixNano": "1", "endTimeUnixNano": "2",
            "attributes": [{"key": "deep", "value": _nested_attribute(depth)}]}
    doc = {"resourceSpans": [{"scopeSpans": [{"spans": [span]}]}]}
    request, raw = decode_request(json.dumps(doc).encode(), "json")
    again, _ = decode_request(raw, PROTOBUF)
    assert again == request and again.resource_spans[0].scope_spans[0].spans[0].name == "x"


def test_protobuf_nested_past_its_parsers_limit_is_malformed():
    """The protobuf runtime bounds message nesting itself (100 levels): an AnyValue nested deeper is a 400."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue

    value = AnyValue(string_value="leaf")
    for _ in range(150):
        outer = AnyValue()
        outer.kvlist_value.values.add(key="k").value.CopyFrom(value)
        value = outer
    request = ExportTraceServiceRequest()
    span = request.resource_spans.add().scope_spans.add().spans.add(trace_id=b"\1" * 16, span_id=b"\2" * 8, name="x")
    span.attributes.add(key="deep").value.CopyFrom(value)
    with pytest.raises(MalformedPayload, match="protobuf"):
        decode_request(request.SerializeToString(), PROTOBUF)
