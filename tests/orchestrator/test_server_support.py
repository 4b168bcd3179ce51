"""Shared helpers for the server tests: echo-engine configs, a running app on a free port, a real OTLP/HTTP
receiver, and polling with a deadline (no fixed sleeps).

Imported by the other ``test_server*``/``test_tracing*``/``test_openai*`` modules; it holds no tests itself.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from adapters import registry
from adapters.echo import EchoEngine, EchoFaults
from muai.config import MuaiConfig, apply_update
from orchestrator.server import STATE, create_app

ADMIN_TOKEN = "test-admin-token-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def echo_config(tmp_path, *, models: list[dict] | None = None, **sections: Any) -> MuaiConfig:
    """Two echo models (generate and embed) that torch stands behind; tracing off unless asked for."""
    model_dir = tmp_path / "echo-model"
    model_dir.mkdir(exist_ok=True)
    if models is None:
        models = [
            {"name": "echo", "path": str(model_dir), "task": "generate", "engine": "echo"},
            {"name": "echo-embed", "path": str(model_dir), "task": "embed", "engine": "echo"},
        ]
    doc: dict[str, Any] = {
        "models": models,
        "telemetry": {
            "tracing": {"enabled": False},
            "metrics": {"resource_interval_s": 0.2},
        },
        "server": {"admin_token": ADMIN_TOKEN, "port": 8000},
    }
    for key, value in sections.items():
        base = doc.get(key, {})
        if isinstance(base, dict) and isinstance(value, dict):
            merged = dict(base)
            for k, v in value.items():
                merged[k] = {**merged[k], **v} if isinstance(merged.get(k), dict) and isinstance(v, dict) else v
            doc[key] = merged
        else:
            doc[key] = value
    return MuaiConfig.model_validate(doc)


def echo_factory(faults: EchoFaults) -> Callable[[str, Any], Any]:
    """Engines as the registry makes them, except that echo engines share ``faults`` (the test's switch)."""

    def make(name: str, settings: Any):
        if name == "echo":
            return EchoEngine({**dict(settings or {}), "faults": faults})
        return registry.create_engine(name, settings)

    return make


async def poll(predicate: Callable[[], Any], *, timeout: float = 20.0, interval: float = 0.02, what: str = "condition") -> Any:
    """Wait until ``predicate()`` (sync or async) is truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


@asynccontextmanager
async def running_app(config: MuaiConfig, *, faults: EchoFaults | None = None, wait_ready: bool = True, **kwargs: Any):
    """The real app (which builds and owns its model manager) on 127.0.0.1:<free port>, with a test client.

    Echo engines share ``faults``, the test's switch for injected failures.
    """
    kwargs.setdefault("update_config", apply_update)
    kwargs.setdefault("engine_factory", echo_factory(faults or EchoFaults()))
    app = create_app(config, **kwargs)
    client = TestClient(TestServer(app, host="127.0.0.1", port=free_port()))
    await client.start_server()
    try:
        if wait_ready:
            async def is_ready():
                resp = await client.get("/health/ready")
                return resp.status == 200
            await poll(is_ready, what="readiness 200")
        yield client, app[STATE]
    finally:
        await client.close()


class OtlpReceiver:
    """A real OTLP/HTTP trace receiver (protobuf), recording every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[Any] = []
        self.requests = 0
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/traces"

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        message = ExportTraceServiceRequest()
        message.ParseFromString(body)
        self.requests += 1
        for resource_spans in message.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend(scope_spans.spans)
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(), content_type="application/x-protobuf")

    async def start(self) -> OtlpReceiver:
        app = web.Application(client_max_size=64 * 1024**2)
        app.router.add_post("/v1/traces", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        self.port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def by_trace(self, trace_id: bytes) -> list[Any]:
        return [s for s in self.spans if s.trace_id == trace_id]


def attrs(span: Any) -> dict[str, Any]:
    """An OTLP span's attributes as a plain dict."""
    out: dict[str, Any] = {}
    for kv in span.attributes:
        value = kv.value
        which = value.WhichOneof("value")
        if which == "array_value":
            out[kv.key] = [getattr(v, v.WhichOneof("value")) for v in value.array_value.values]
        else:
            out[kv.key] = getattr(value, which) if which else None
    return out


async def wait_for(what: str, check: Callable[[], Awaitable[Any] | Any], timeout: float = 20.0) -> Any:
    return await poll(check, timeout=timeout, what=what)
