"""OTLP/HTTP export of the orchestrator's spans, with an encoder written for them (issue 16).

The SDK's OTLP encoder builds a protobuf message object per span, attribute and value: about 37 us a span here,
on the export thread but under the serving process's GIL. :func:`encode_spans` writes the same
``ExportTraceServiceRequest`` straight to protobuf's wire format from the ``ReadableSpan`` fields, keeping the bytes
of what repeats (each attribute key, each string or boolean attribute with its value, the resource and the
scope) in small bounded caches: about a third of the cost. Every field is written as ``opentelemetry-proto``
defines it (``trace.proto``, ``common.proto``); the tests decode the bytes with ``opentelemetry-proto`` and compare
them with the SDK encoder's message.

:class:`OtlpHttpSpanExporter` posts those bytes (``application/x-protobuf``) the way the SDK's OTLP/HTTP exporter
does: retried with exponential backoff on 429, 502, 503, 504 and connection errors until ``timeout_s`` is spent,
and the same environment read (``OTEL_EXPORTER_OTLP_TRACES_*``, else ``OTEL_EXPORTER_OTLP_*``): ``HEADERS``,
``CERTIFICATE`` (when ``telemetry.tracing.ca_file`` is unset), ``CLIENT_CERTIFICATE``/``CLIENT_KEY``,
``COMPRESSION=gzip``. ``telemetry.tracing.protocol: grpc`` keeps the SDK's gRPC exporter.
"""

from __future__ import annotations

import gzip
import logging
import os
import random
import struct
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.util.re import parse_env_headers

log = logging.getLogger(__name__)

_PACK_DOUBLE = struct.Struct("<d").pack
_PACK_FIXED64 = struct.Struct("<Q").pack
_PACK_FIXED32 = struct.Struct("<I").pack
_KIND = {SpanKind.INTERNAL: 1, SpanKind.SERVER: 2, SpanKind.CLIENT: 3, SpanKind.PRODUCER: 4, SpanKind.CONSUMER: 5}
_KIND_FIELD = {kind: b"\x30" + bytes((value,)) for kind, value in _KIND.items()}
_STATUS = {StatusCode.UNSET: 0, StatusCode.OK: 1, StatusCode.ERROR: 2}
_HAS_IS_REMOTE, _IS_REMOTE = 0x100, 0x200  # Span.flags bits 8 and 9; bits 0-7 are the W3C trace flags
_CACHE_LIMIT = 4096
RETRYABLE_STATUS = frozenset({429, 502, 503, 504})


def _varint(value: int) -> bytes:
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_TAGS = [_varint((number << 3) | 2) for number in range(17)]  # length-delimited tags of fields 0-16
_SHORT = [bytes((n,)) for n in range(0x80)]  # a length under 128 is its own varint byte


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (strings, bytes, embedded messages)."""
    size = len(payload)
    return _TAGS[number] + (_SHORT[size] if size < 0x80 else _varint(size)) + payload


def _value(value: Any) -> bytes:
    """An ``AnyValue``'s fields."""
    kind = type(value)
    if kind is str:
        return _field(1, value.encode("utf-8", "surrogatepass"))
    if kind is bool:
        return b"\x10\x01" if value else b"\x10\x00"
    if kind is int:
        return b"\x18" + _varint(value & 0xFFFFFFFFFFFFFFFF)  # int64: negatives as 64-bit two's complement
    if kind is float:
        return b"\x21" + _PACK_DOUBLE(value)
    if kind is bytes:
        return _field(7, value)
    if isinstance(value, (tuple, list)):
        return _field(5, b"".join(_field(1, _value(v)) for v in value))
    if isinstance(value, Mapping):
        return _field(6, b"".join(_field(1, _key_value(str(k), v)) for k, v in value.items()))
    return _field(1, str(value).encode("utf-8", "surrogatepass"))  # what the SDK's spans would not have let in


_KEYS: dict[str, bytes] = {}
_PAIRS: dict[tuple[int, str, Any, type], bytes] = {}


def _key_value(key: str, value: Any) -> bytes:
    """A ``KeyValue``'s fields."""
    encoded_key = _KEYS.get(key)
    if encoded_key is None:
        encoded_key = _field(1, key.encode("utf-8", "surrogatepass"))
        if len(_KEYS) < _CACHE_LIMIT:
            _KEYS[key] = encoded_key
    return encoded_key + _field(2, _value(value))


def _attributes(number: int, attributes: Mapping[str, Any] | None) -> bytes:
    if not attributes:
        return b""
    parts = []
    for key, value in attributes.items():
        kind = type(value)
        if kind is str or kind is bool:
            # Model names, operations, engines, finish reasons: the same few pairs on every span.
            pair = (number, key, value, kind)
            encoded = _PAIRS.get(pair)
            if encoded is None:
                encoded = _field(number, _key_value(key, value))
                if len(_PAIRS) < _CACHE_LIMIT and (kind is bool or len(value) <= 64):
                    _PAIRS[pair] = encoded
            parts.append(encoded)
        else:
            parts.append(_field(number, _key_value(key, value)))
    return b"".join(parts)


def _dropped(number: int, count: int) -> bytes:
    return b"" if not count else _varint(number << 3) + _varint(count)


def _span(span: ReadableSpan) -> bytes:
    context = span.context
    parent = span.parent
    # Fields 1 and 2 (16 and 8 bytes), 4 (8 bytes), 6 (a varint), 7 and 8 (fixed64): their tags and lengths.
    parts = [b"\x0a\x10" + context.trace_id.to_bytes(16, "big") + b"\x12\x08" + context.span_id.to_bytes(8, "big")]
    if context.trace_state:
        parts.append(_field(3, context.trace_state.to_header().encode()))
    if parent is not None:
        parts.append(b"\x22\x08" + parent.span_id.to_bytes(8, "big"))
    parts.append(_field(5, span.name.encode("utf-8", "surrogatepass")))
    parts.append(_KIND_FIELD[span.kind] + b"\x39" + _PACK_FIXED64(span.start_time or 0) + b"\x41"
                 + _PACK_FIXED64(span.end_time or 0))
    parts.append(_attributes(9, span.attributes))
    parts.append(_dropped(10, span.dropped_attributes))
    for event in span.events:
        parts.append(_field(11, b"\x09" + _PACK_FIXED64(event.timestamp or 0)
                            + _field(2, event.name.encode("utf-8", "surrogatepass")) + _attributes(3, event.attributes)
                            + _dropped(4, getattr(event, "dropped_attributes", 0))))
    parts.append(_dropped(12, span.dropped_events))
    for link in span.links:
        linked = link.context
        body = _field(1, linked.trace_id.to_bytes(16, "big")) + _field(2, linked.span_id.to_bytes(8, "big"))
        if linked.trace_state:
            body += _field(3, linked.trace_state.to_header().encode())
        body += _attributes(4, link.attributes) + _dropped(5, getattr(link, "dropped_attributes", 0))
        body += b"\x35" + _PACK_FIXED32(int(linked.trace_flags) | _HAS_IS_REMOTE | (_IS_REMOTE if linked.is_remote else 0))
        parts.append(_field(13, body))
    parts.append(_dropped(14, span.dropped_links))
    status = span.status
    if status is not None:
        body = _field(2, status.description.encode("utf-8", "surrogatepass")) if status.description else b""
        code = _STATUS[status.status_code]
        parts.append(_field(15, body + (b"\x18" + _varint(code) if code else b"")))
    flags = int(context.trace_flags) | _HAS_IS_REMOTE | (_IS_REMOTE if parent is not None and parent.is_remote else 0)
    parts.append(b"\x85\x01" + _PACK_FIXED32(flags))  # field 16, fixed32
    return b"".join(parts)


_RESOURCES: dict[int, tuple[Any, bytes]] = {}


def _resource(resource: Any) -> bytes:
    """A ``ResourceSpans.resource`` field, and its schema URL (field 3 of ``ResourceSpans``); kept per resource
    object (a provider has one for its life)."""
    cached = _RESOURCES.get(id(resource))
    if cached is not None and cached[0] is resource:
        return cached[1]
    encoded = _field(1, _attributes(1, resource.attributes))
    if len(_RESOURCES) < 64:
        _RESOURCES[id(resource)] = (resource, encoded)
    return encoded


def _scope(scope: Any) -> bytes:
    if scope is None:
        return b""
    body = _field(1, scope.name.encode()) if scope.name else b""
    if scope.version:
        body += _field(2, scope.version.encode())
    body += _attributes(3, getattr(scope, "attributes", None))
    return _field(1, body)


def encode_spans(spans: Sequence[ReadableSpan]) -> bytes:
    """``spans`` as one serialised ``ExportTraceServiceRequest``: one ``ResourceSpans`` per resource, one
    ``ScopeSpans`` per instrumentation scope, in the order they first appear."""
    grouped: dict[int, tuple[Any, dict[Any, tuple[Any, list[bytes]]]]] = {}
    for span in spans:
        resource = span.resource
        by_scope = grouped.setdefault(id(resource), (resource, {}))[1]
        scope = span.instrumentation_scope
        key = (scope.name, scope.version, scope.schema_url) if scope is not None else None
        by_scope.setdefault(key, (scope, []))[1].append(_field(2, _span(span)))
    out = []
    for resource, by_scope in grouped.values():
        body = [_resource(resource)]
        for scope, encoded in by_scope.values():
            scope_body = _scope(scope) + b"".join(encoded)
            if scope is not None and scope.schema_url:
                scope_body += _field(3, scope.schema_url.encode())
            body.append(_field(2, scope_body))
        if getattr(resource, "schema_url", ""):
            body.append(_field(3, resource.schema_url.encode()))
        out.append(_field(1, b"".join(body)))
    return b"".join(out)


def _env(name: str) -> str | None:
    """``OTEL_EXPORTER_OTLP_TRACES_<name>``, else ``OTEL_EXPORTER_OTLP_<name>`` (the traces-specific one wins)."""
    return os.environ.get(f"OTEL_EXPORTER_OTLP_TRACES_{name}") or os.environ.get(f"OTEL_EXPORTER_OTLP_{name}") or None


def env_headers() -> dict[str, str]:
    """The OTLP headers of the environment (``OTEL_EXPORTER_OTLP_TRACES_HEADERS``, else
    ``OTEL_EXPORTER_OTLP_HEADERS``), parsed as the SDK's exporters parse them."""
    return parse_env_headers(_env("HEADERS") or "", liberal=True)


class OtlpHttpSpanExporter(SpanExporter):
    """OTLP/HTTP (protobuf) export of one provider's spans: see the module's docstring."""

    def __init__(self, endpoint: str, *, timeout_s: float = 10.0, session: Any = None,
                 certificate_file: str | None = None) -> None:
        import requests  # the SDK's OTLP/HTTP exporter's transport too; loaded only when tracing exports

        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._session = session if session is not None else requests.Session()
        # What the SDK's exporter reads from the environment: the CA (when no ca_file is configured), a client
        # certificate and key, gzip.
        ca = certificate_file or _env("CERTIFICATE")
        if ca:
            self._session.verify = ca
        client_cert, client_key = _env("CLIENT_CERTIFICATE"), _env("CLIENT_KEY")
        if client_cert:
            self._session.cert = (client_cert, client_key) if client_key else client_cert
        self._gzip = (_env("COMPRESSION") or "").strip().lower() == "gzip"
        headers = {**env_headers(), "Content-Type": "application/x-protobuf"}
        if self._gzip:
            headers["Content-Encoding"] = "gzip"
        self._session.headers.update(headers)
        self._shutdown = threading.Event()
        self._requests = requests

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._shutdown.is_set():
            return SpanExportResult.FAILURE
        try:
            body = encode_spans(spans)
            if self._gzip:
                body = gzip.compress(body)
        except Exception as exc:
            log.error("could not encode %d spans for OTLP: %r", len(spans), exc)
            return SpanExportResult.FAILURE
        deadline = time.monotonic() + self.timeout_s
        delay = 1.0
        while True:
            left = deadline - time.monotonic()
            try:
                response = self._session.post(self.endpoint, data=body, timeout=max(left, 0.001))
            except self._requests.exceptions.RequestException as exc:
                problem: str = f"{type(exc).__name__}"
                retry = True
            else:
                if 200 <= response.status_code < 300:
                    return SpanExportResult.SUCCESS
                problem = f"HTTP {response.status_code}"
                retry = response.status_code in RETRYABLE_STATUS
            # Jittered exponential backoff, never past the export's own deadline.
            wait = delay * random.uniform(0.8, 1.2)
            if not retry or time.monotonic() + wait >= deadline or self._shutdown.wait(wait):
                log.debug("OTLP export of %d spans to %s failed: %s", len(spans), self.endpoint, problem)
                return SpanExportResult.FAILURE
            delay *= 2

    def shutdown(self) -> None:
        self._shutdown.set()
        self._session.close()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


__all__ = ["RETRYABLE_STATUS", "OtlpHttpSpanExporter", "encode_spans", "env_headers"]
