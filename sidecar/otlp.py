"""OTLP/HTTP trace payloads: decoding, and mapping spans to request samples.

Pure functions, no I/O: the receiver in ``app.py`` is a thin shell around them.

Which spans count (also written down in ``docs/sidecar-api.md``; the orchestrator follows it):

* A span named ``llm_request`` (vLLM's own request span) is a **request**.
* A span carrying ``gen_ai.operation.name`` is a **request** when its attribute ``muai.request`` is true, or,
  with that attribute absent, when it is a ``SERVER`` span or has no parent. ``muai.request = false`` makes it an
  inference span whatever its kind.
* Every other span carrying ``gen_ai.operation.name`` is an **inference** sample (per-model inference time, 9.2).
* Spans without ``gen_ai.operation.name`` are accepted (and forwarded) but feed no statistics.

A span sampled with OpenTelemetry's consistent probability sampling says so in its ``tracestate``
(``ot=th:...``); its sample carries the adjusted count 1/p as ``weight``, which the monitor sums and weights by.
"""

from __future__ import annotations

import base64
import json
import math
import zlib
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTracePartialSuccess,
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from pydantic_core import from_json

from sidecar.errors import MalformedPayload, PayloadTooLarge, UnsupportedMediaType

PROTOBUF = "protobuf"
JSON = "json"
_CONTENT_TYPES = {
    "application/x-protobuf": PROTOBUF,
    "application/protobuf": PROTOBUF,
    "application/json": JSON,
}
RESPONSE_CONTENT_TYPE = {PROTOBUF: "application/x-protobuf", JSON: "application/json"}

REQUEST = "request"
INFERENCE = "inference"
SCOPES = (REQUEST, INFERENCE)

ATTR_OPERATION = "gen_ai.operation.name"
ATTR_REQUEST_MODEL = "gen_ai.request.model"
ATTR_RESPONSE_MODEL = "gen_ai.response.model"
ATTR_INPUT_TOKENS = "gen_ai.usage.input_tokens"
ATTR_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
ATTR_PROMPT_TOKENS = "gen_ai.usage.prompt_tokens"  # vLLM's older names
ATTR_COMPLETION_TOKENS = "gen_ai.usage.completion_tokens"
ATTR_E2E = "gen_ai.latency.e2e"
ATTR_TTFT = "gen_ai.latency.time_to_first_token"
ATTR_ERROR_TYPE = "error.type"
ATTR_ENGINE = "muai.engine"
ATTR_WORKFLOW = "muai.workflow"
ATTR_IS_REQUEST = "muai.request"
VLLM_REQUEST_SPAN = "llm_request"
VLLM_DEFAULT_OPERATION = "text_completion"
UNKNOWN = "unknown"

_WANTED = frozenset(
    {
        ATTR_OPERATION, ATTR_REQUEST_MODEL, ATTR_RESPONSE_MODEL, ATTR_INPUT_TOKENS, ATTR_OUTPUT_TOKENS,
        ATTR_PROMPT_TOKENS, ATTR_COMPLETION_TOKENS, ATTR_E2E, ATTR_TTFT, ATTR_ERROR_TYPE, ATTR_ENGINE,
        ATTR_WORKFLOW, ATTR_IS_REQUEST,
    }
)
_SPAN_KIND_SERVER = 2
_STATUS_ERROR = 2
_MAX_LABEL = 128


@dataclass(slots=True)
class SpanSample:
    """What one request or inference span contributes to the statistics."""

    scope: str
    model: str
    operation: str
    duration_s: float
    error: bool
    ttft_s: float | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    engine: str | None = None
    weight: float = 1.0
    """The span's adjusted count: 1/p of its ``ot=th:`` sampling threshold, 1 when it carries none."""


_SPACE = float(1 << 56)


def adjusted_count(trace_state: str) -> float:
    """1/p of a W3C ``tracestate``'s OpenTelemetry threshold (``ot=th:<hex>``); 1 when absent or malformed.

    The threshold ``T`` (56 bits, trailing hex zeros dropped) rejects randomness below it, so ``p = 1 - T / 2**56``.
    """
    if "th:" not in trace_state:
        return 1.0
    for member in trace_state.split(","):
        key, _, value = member.strip().partition("=")
        if key != "ot":
            continue
        for part in value.split(";"):
            if part.startswith("th:"):
                th = part[3:]
                if not 0 < len(th) <= 14:
                    return 1.0
                try:
                    threshold = int(th.ljust(14, "0"), 16)
                except ValueError:
                    return 1.0
                return _SPACE / (_SPACE - threshold)
        return 1.0
    return 1.0


@dataclass(slots=True)
class MappedBatch:
    """The outcome of mapping one export request."""

    samples: list[SpanSample]
    spans: int
    rejected: int
    error_message: str = ""


def media_kind(content_type: str | None) -> str:
    """``protobuf`` or ``json`` for an OTLP Content-Type (parameters such as charset ignored); else 415."""
    base = (content_type or "").split(";", 1)[0].strip().lower()
    kind = _CONTENT_TYPES.get(base)
    if kind is None:
        raise UnsupportedMediaType(
            f"unsupported Content-Type {content_type!r}: OTLP/HTTP takes application/x-protobuf or application/json"
        )
    return kind


def decompress(body: bytes, content_encoding: str | None, *, limit: int) -> bytes:
    """Undo ``Content-Encoding: gzip`` without ever holding more than ``limit`` bytes of output."""
    encoding = (content_encoding or "identity").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding != "gzip":
        raise UnsupportedMediaType(f"unsupported Content-Encoding {content_encoding!r}: OTLP/HTTP takes gzip or none")
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise MalformedPayload(f"body is not valid gzip: {exc}") from exc
    if len(out) > limit:
        raise PayloadTooLarge(f"decompressed body exceeds {limit} bytes")
    if not inflater.eof:
        raise MalformedPayload("gzip body is truncated")
    return out


def _hex_to_b64(value: object, field: str) -> str:
    if not isinstance(value, str):
        raise MalformedPayload(f"{field} must be a hex string")
    try:
        return base64.b64encode(bytes.fromhex(value)).decode("ascii")
    except ValueError as exc:
        raise MalformedPayload(f"{field} {value[:40]!r} is not hex") from exc


def _fix_ids(obj: dict, fields: tuple[str, ...]) -> None:
    # OTLP/JSON writes trace and span ids as hex, where protobuf's JSON mapping expects base64.
    for field in fields:
        if field in obj and obj[field] != "":
            obj[field] = _hex_to_b64(obj[field], field)


_ID_FIELDS = ("traceId", "trace_id", "spanId", "span_id", "parentSpanId", "parent_span_id")


# pydantic-core's parser (jiter) refuses nesting past about 200 levels in Rust, where json.loads would recurse into
# Python's stack limit: one bound for every JSON body the sidecar reads (no OTLP message nests anywhere near it).
JSON_MAX_DEPTH = 200


def load_json(body: bytes) -> Any:
    """A JSON body with its nesting bounded; :class:`MalformedPayload` (a 400) saying why when it is not one."""
    try:
        return from_json(body)
    except ValueError as exc:
        if "recursion limit exceeded" in str(exc):
            raise MalformedPayload(f"body is nested deeper than {JSON_MAX_DEPTH} levels") from None
        raise MalformedPayload(f"body is not JSON: {exc}") from None


def _parse_json(body: bytes) -> ExportTraceServiceRequest:
    doc = load_json(body)
    if not isinstance(doc, dict):
        raise MalformedPayload("OTLP/JSON body must be an object")
    try:
        for rs in doc.get("resourceSpans", doc.get("resource_spans")) or ():
            for ss in rs.get("scopeSpans", rs.get("scope_spans")) or ():
                for span in ss.get("spans") or ():
                    _fix_ids(span, _ID_FIELDS)
                    for link in span.get("links") or ():
                        _fix_ids(link, _ID_FIELDS)
        return json_format.ParseDict(doc, ExportTraceServiceRequest(), ignore_unknown_fields=True)
    except MalformedPayload:
        raise
    except (json_format.ParseError, AttributeError, TypeError, ValueError, RecursionError) as exc:
        raise MalformedPayload(f"body is not an OTLP/JSON ExportTraceServiceRequest: {exc}") from exc


def decode_request(body: bytes, kind: str) -> tuple[ExportTraceServiceRequest, bytes]:
    """Parse an (already decompressed) body; returns the message and its protobuf bytes (for forwarding)."""
    if kind == PROTOBUF:
        request = ExportTraceServiceRequest()
        try:
            request.ParseFromString(body)
        except (DecodeError, RecursionError, ValueError) as exc:
            raise MalformedPayload(f"body is not a protobuf ExportTraceServiceRequest: {exc}") from exc
        return request, body
    request = _parse_json(body)
    return request, request.SerializeToString()


def _value(any_value):
    which = any_value.WhichOneof("value")
    if which is None or which in ("array_value", "kvlist_value", "bytes_value"):
        return None
    return getattr(any_value, which)


def _number(value) -> float | None:
    """A finite number from an attribute value; anything else (bool, text, NaN, inf) counts as absent."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _count(value) -> int | None:
    number = _number(value)
    if number is None or number < 0:
        return None
    return int(number)


def _label(value) -> str | None:
    if value is None or value == "":
        return None
    text = value if isinstance(value, str) else str(value)
    return text[:_MAX_LABEL]


def map_request(request: ExportTraceServiceRequest) -> MappedBatch:
    """Turn every request/inference span of an export request into a :class:`SpanSample`.

    Spans with invalid ids (trace id not 16 bytes, span id not 8) or that end before they start are rejected
    and counted, as OTLP's partial success describes.
    """
    samples: list[SpanSample] = []
    spans = 0
    rejected = 0
    first_error = ""
    wanted = _WANTED
    for resource_spans in request.resource_spans:
        service = None
        for kv in resource_spans.resource.attributes:
            if kv.key == "service.name":
                service = _label(_value(kv.value))
                break
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans += 1
                if len(span.trace_id) != 16 or len(span.span_id) != 8:
                    rejected += 1
                    first_error = first_error or "span with an invalid trace_id or span_id"
                    continue
                start = span.start_time_unix_nano
                end = span.end_time_unix_nano
                if end < start:
                    rejected += 1
                    first_error = first_error or "span ends before it starts"
                    continue
                attrs = {}
                for kv in span.attributes:
                    key = kv.key
                    if key in wanted:
                        attrs[key] = _value(kv.value)
                operation = attrs.get(ATTR_OPERATION)
                name = span.name
                if name == VLLM_REQUEST_SPAN:
                    scope = REQUEST
                    operation = _label(operation) or VLLM_DEFAULT_OPERATION
                elif operation is None or operation == "":
                    continue
                else:
                    operation = _label(operation)
                    flag = attrs.get(ATTR_IS_REQUEST)
                    if flag is not None:
                        is_request = flag is True or flag == "true"
                    else:
                        is_request = span.kind == _SPAN_KIND_SERVER or not span.parent_span_id
                    scope = REQUEST if is_request else INFERENCE
                model = (
                    _label(attrs.get(ATTR_REQUEST_MODEL))
                    or _label(attrs.get(ATTR_RESPONSE_MODEL))
                    or _label(attrs.get(ATTR_WORKFLOW))
                    or service
                    or UNKNOWN
                )
                e2e = _number(attrs.get(ATTR_E2E))
                duration = e2e if e2e is not None and e2e >= 0 else (end - start) / 1e9
                ttft = _number(attrs.get(ATTR_TTFT))
                input_tokens = _count(attrs.get(ATTR_INPUT_TOKENS))
                if input_tokens is None:
                    input_tokens = _count(attrs.get(ATTR_PROMPT_TOKENS))
                output_tokens = _count(attrs.get(ATTR_OUTPUT_TOKENS))
                if output_tokens is None:
                    output_tokens = _count(attrs.get(ATTR_COMPLETION_TOKENS))
                samples.append(
                    SpanSample(
                        scope,
                        model,
                        operation,
                        duration,
                        span.status.code == _STATUS_ERROR or ATTR_ERROR_TYPE in attrs,
                        ttft if ttft is not None and ttft >= 0 else None,
                        input_tokens,
                        output_tokens,
                        _label(attrs.get(ATTR_ENGINE)),
                        adjusted_count(span.trace_state) if span.trace_state else 1.0,
                    )
                )
    return MappedBatch(samples, spans, rejected, first_error)


def encode_response(kind: str, *, rejected: int = 0, error_message: str = "") -> bytes:
    """The OTLP success (or partial-success) response in the request's encoding."""
    response = ExportTraceServiceResponse()
    if rejected or error_message:
        response.partial_success.CopyFrom(ExportTracePartialSuccess(rejected_spans=rejected, error_message=error_message))
    if kind == PROTOBUF:
        return response.SerializeToString()
    return json.dumps(json_format.MessageToDict(response)).encode()


_GRPC_CODES = {400: 3, 413: 8, 415: 3, 503: 14}  # INVALID_ARGUMENT, RESOURCE_EXHAUSTED, UNAVAILABLE


def encode_status(kind: str | None, http_status: int, message: str) -> tuple[bytes, str]:
    """An OTLP error body (``google.rpc.Status``) and its Content-Type; JSON when the request's kind is unknown."""
    code = _GRPC_CODES.get(http_status, 13)  # INTERNAL
    if kind == PROTOBUF:
        try:
            from google.rpc.status_pb2 import Status
        except ImportError:  # googleapis-common-protos is optional; fall back to the JSON form
            pass
        else:
            return Status(code=code, message=message).SerializeToString(), RESPONSE_CONTENT_TYPE[PROTOBUF]
    return json.dumps({"code": code, "message": message}).encode(), RESPONSE_CONTENT_TYPE[JSON]


__all__ = [
    "INFERENCE",
    "JSON",
    "PROTOBUF",
    "REQUEST",
    "SCOPES",
    "MappedBatch",
    "SpanSample",
    "adjusted_count",
    "decode_request",
    "decompress",
    "encode_response",
    "encode_status",
    "map_request",
    "media_kind",
]
