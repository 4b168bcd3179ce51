"""Shared helpers for the server tests: echo-engine configs, a running app on a free port, and (from ``support``)
a real OTLP/HTTP receiver and polling with a deadline (no fixed sleeps).

Imported by the other ``test_server*``/``test_tracing*``/``test_openai*`` modules; it holds no tests itself.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

from aiohttp.test_utils import TestClient, TestServer
from support.ports import free_port
from support.receiver import OtlpReceiver
from support.receiver import span_attributes as attrs
from support.waiting import apoll

from adapters import registry
from adapters.echo import EchoEngine, EchoFaults
from muai.config import MuaiConfig, apply_update
from orchestrator.server import STATE, create_app

__all__ = ["ADMIN_TOKEN", "OtlpReceiver", "attrs", "echo_config", "echo_factory", "free_port", "poll", "running_app"]

ADMIN_TOKEN = "test-admin-token-0123456789"


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
    """Wait until ``predicate()`` (sync or async) is truthy; fail after ``timeout`` (the server tests' 20 s)."""
    return await apoll(predicate, timeout=timeout, interval=interval, what=what)


@asynccontextmanager
async def running_app(config: MuaiConfig, *, faults: EchoFaults | None = None, wait_ready: bool = True, **kwargs: Any):
    """The real app (which builds and owns its model manager) on 127.0.0.1:<free port>, with a test client.

    Echo engines share ``faults``, the test's switch for injected failures.
    """
    kwargs.setdefault("update_config", apply_update)
    kwargs.setdefault("engine_factory", echo_factory(faults or EchoFaults()))
    app = create_app(config, **kwargs)
    server = TestServer(app, host="127.0.0.1", port=free_port())
    # As serve() runs it: request bodies are inflated by the handlers, not by aiohttp.
    await server.start_server(auto_decompress=False)
    client = TestClient(server)
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
