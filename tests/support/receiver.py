"""Receivers that stand where an operator's webhook subscriber or tracing backend would be: real aiohttp servers
on 127.0.0.1 that record what reaches them (our own endpoints, not fakes of someone else's server)."""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Self

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class RecordingServer:
    """An aiohttp app on 127.0.0.1 serving ``routes`` (path -> POST handler); ``async with`` starts and stops it."""

    def __init__(self, routes: Mapping[str, Handler]) -> None:
        self.routes = dict(routes)
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self, port: int = 0) -> RecordingServer:
        """Listen on ``port`` (0: one the OS picks)."""
        app = web.Application(client_max_size=64 * 1024**2)
        for path, handler in self.routes.items():
            app.router.add_post(path, handler)
        # A short shutdown: a handler a test keeps waiting must not hold up its teardown.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> RecordingServer:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


class _Endpoint:
    """One recording handler; :meth:`start` serves it alone at ``path`` (or mount ``handle`` on a shared server)."""

    path = "/"

    def __init__(self) -> None:
        self.url = ""
        self._server: RecordingServer | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raise NotImplementedError

    async def start(self, port: int = 0) -> Self:
        self._server = await RecordingServer({self.path: self.handle}).start(port)
        self.url = self._server.url(self.path)
        return self

    @property
    def port(self) -> int:
        return self._server.port if self._server else 0

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


@dataclass
class Received:
    """One request a :class:`WebhookReceiver` got, and the status it answered."""

    body: bytes
    headers: dict[str, str]
    status: int

    def json(self) -> Any:
        return json.loads(self.body)


class WebhookReceiver(_Endpoint):
    """A webhook subscriber: records every POST. It answers ``fail_status`` to the first ``fail_first`` requests
    and, while ``gate`` is set and not yet open, holds each request until it opens."""

    path = "/hook"

    def __init__(self, *, fail_first: int = 0, fail_status: int = 500, gate: asyncio.Event | None = None) -> None:
        super().__init__()
        self.fail_first = fail_first
        self.fail_status = fail_status
        self.gate = gate
        self.requests: list[Received] = []

    @property
    def accepted(self) -> list[Received]:
        return [r for r in self.requests if r.status == 200]

    def alerts(self, alertname: str, **labels: str) -> list[tuple[str, dict]]:
        """(status, alert) for every alert named ``alertname`` with ``labels`` in the accepted Alertmanager-shaped
        payloads, in the order they came."""
        out = []
        for received in self.accepted:
            for alert in received.json().get("alerts", []):
                got = alert.get("labels", {})
                if got.get("alertname") == alertname and all(got.get(k) == v for k, v in labels.items()):
                    out.append((alert.get("status"), alert))
        return out

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.gate is not None:
            await self.gate.wait()
        failing = len(self.requests) < self.fail_first
        status = self.fail_status if failing else 200
        self.requests.append(Received(body=body, headers=dict(request.headers), status=status))
        return web.json_response({"ok": not failing}, status=status)


class OtlpReceiver(_Endpoint):
    """A real OTLP/HTTP trace receiver (protobuf), recording every span it is sent (as the protobuf messages) and
    each request's headers. It answers ``fail_status`` to the first ``fail_first`` requests (recording nothing)."""

    path = "/v1/traces"

    def __init__(self, *, fail_first: int = 0, fail_status: int = 503) -> None:
        super().__init__()
        self.spans: list[Any] = []
        self.requests = 0
        self.headers: list[dict[str, str]] = []
        self.fail_first = fail_first
        self.fail_status = fail_status
        self.refused = 0

    @property
    def endpoint(self) -> str:
        return self.url

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        self.headers.append(dict(request.headers))
        if self.refused < self.fail_first:
            self.refused += 1
            return web.Response(status=self.fail_status, text="not now")
        if raw[:2] == b"\x1f\x8b":  # aiohttp may already have undone Content-Encoding: gzip
            raw = gzip.decompress(raw)
        message = ExportTraceServiceRequest.FromString(raw)
        self.requests += 1
        for resource_spans in message.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend(scope_spans.spans)
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(), content_type="application/x-protobuf")

    def by_trace(self, trace_id: bytes) -> list[Any]:
        return [s for s in self.spans if s.trace_id == trace_id]

    def records(self) -> list[dict[str, Any]]:
        """Every span as a plain dict: hex ids, name, kind and decoded attributes."""
        return [
            {
                "trace_id": span.trace_id.hex(),
                "span_id": span.span_id.hex(),
                "parent_id": span.parent_span_id.hex(),
                "name": span.name,
                "kind": span.kind,
                "attributes": span_attributes(span),
            }
            for span in self.spans
        ]


def span_attributes(span: Any) -> dict[str, Any]:
    """An OTLP span's attributes as a plain dict (arrays as lists, key-value lists as dicts)."""
    return {kv.key: _any_value(kv.value) for kv in span.attributes}


def _any_value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _any_value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, kind) if kind else None
