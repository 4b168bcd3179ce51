"""The machinery of the end-to-end test: child processes on free 127.0.0.1 ports, their configurations, a
receiver for webhooks and forwarded spans, polling, and a thin Prometheus query client.

Nothing here fakes a component: the orchestrator, the sidecar, Prometheus and Alertmanager are the real
programs, started as child processes and stopped by PID. The receiver stands where an operator's webhook
subscriber and tracing backend would be, and only records what reaches it.
"""

from __future__ import annotations

import asyncio
import ctypes
import gzip
import importlib.util
import inspect
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import yaml
from aiohttp import web

ROOT = Path(__file__).resolve().parents[2]
RULES_FILE = ROOT / "dashboards" / "prometheus" / "rules" / "muai-alerts.yml"
PROMETHEUS = shutil.which("prometheus")
ALERTMANAGER = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
MISSING_BINARIES = ", ".join(
    name for name, path in (("prometheus", PROMETHEUS), ("prometheus-alertmanager", ALERTMANAGER)) if path is None
)


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports on 127.0.0.1 (all held open at once, so the OS cannot hand one out twice)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it if the test process dies without its teardown (Linux prctl)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def load_dashboards_build() -> ModuleType:
    """``dashboards/build.py``, imported by path (``dashboards/`` is not a Python package)."""
    spec = importlib.util.spec_from_file_location("muai_dashboards_build_e2e", ROOT / "dashboards" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def wait_for(
    condition: Callable[[], Any | Awaitable[Any]],
    *,
    timeout: float,
    interval: float = 0.25,
    what: str = "condition",
    diagnose: Callable[[], str] | None = None,
) -> Any:
    """Poll ``condition`` (sync or async) until it returns something truthy, and return that; fail after ``timeout``.

    ``diagnose`` adds context (process logs, the last answer seen) to the failure message.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = condition()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return value
            last_error = None
        except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            extra = f"\n{diagnose()}" if diagnose else ""
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}{detail}{extra}")
        await asyncio.sleep(interval)


# -- processes ---------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Process:
    """One child process, its output in a log file; :meth:`stop` ends it by PID (terminate, wait, kill)."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    proc: subprocess.Popen | None = None

    def start(self) -> Process:
        log = self.log_path.open("wb")
        try:
            self.proc = subprocess.Popen(
                self.argv, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        finally:
            log.close()  # the child holds its own descriptor
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return text[-chars:]

    def describe(self) -> str:
        state = "running" if self.alive() else f"exited with {self.proc.returncode if self.proc else 'never started'}"
        return f"--- {self.name} (pid {self.pid}, {state}), end of {self.log_path}:\n{self.log_tail()}"

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment without ``MUAI_*`` overrides (the YAML file alone configures the stack),
    keeping the cache location so the embedded models are built once per checkout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MUAI_") or k == "MUAI_CACHE_DIR"}
    env.update(extra)
    return env


def muai_argv(command: str, config_path: Path) -> list[str]:
    return [sys.executable, "-m", "muai", command, "--config", str(config_path)]


# -- configurations ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ports:
    """Where each part of the stack listens (all on 127.0.0.1)."""

    orchestrator: int
    sidecar: int
    prometheus: int
    alertmanager: int
    receiver: int

    @classmethod
    def allocate(cls) -> Ports:
        return cls(*free_ports(5))

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{getattr(self, name)}"


def write_yaml(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def prometheus_config(ports: Ports) -> dict:
    """Both targets every second under the job names the rules and dashboards use, and the shipped rules."""
    def job(name: str, port: int, component: str) -> dict:
        return {
            "job_name": name,
            "metrics_path": "/metrics",
            "static_configs": [{"targets": [f"127.0.0.1:{port}"], "labels": {"component": component}}],
        }

    return {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES_FILE)],
        "scrape_configs": [
            job("muai-orchestrator", ports.orchestrator, "orchestrator"),
            job("muai-sidecar", ports.sidecar, "sidecar"),
        ],
    }


def alertmanager_config(webhook_url: str) -> dict:
    """One webhook receiver, notified at once and again a second after any change (resolutions included)."""
    return {
        "route": {
            "receiver": "e2e-hook",
            "group_by": ["alertname", "model", "operation"],
            "group_wait": "0s",
            "group_interval": "1s",
            "repeat_interval": "1h",
        },
        "receivers": [{"name": "e2e-hook", "webhook_configs": [{"url": webhook_url, "send_resolved": True}]}],
    }


# -- the receiver: webhooks and forwarded spans -------------------------------------------------------------------


class Receiver:
    """Records Alertmanager's webhook posts (``/alertmanager``), the sidecar's webhook sink (``/sidecar``) and the
    span batches the sidecar forwards (``/v1/traces``, OTLP/HTTP protobuf, decoded with the OTLP protos)."""

    def __init__(self) -> None:
        self.webhooks: dict[str, list[tuple[dict, bytes, dict[str, str]]]] = {"alertmanager": [], "sidecar": []}
        self.spans: list[dict[str, Any]] = []
        self._runner: web.AppRunner | None = None

    async def start(self, port: int) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/alertmanager", self._hook("alertmanager"))
        app.router.add_post("/sidecar", self._hook("sidecar"))
        app.router.add_post("/v1/traces", self._traces)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _hook(self, source: str):
        async def handle(request: web.Request) -> web.Response:
            raw = await request.read()
            self.webhooks[source].append((json.loads(raw), raw, dict(request.headers)))
            return web.Response(text="ok")

        return handle

    async def _traces(self, request: web.Request) -> web.Response:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
            ExportTraceServiceResponse,
        )

        raw = await request.read()
        if raw[:2] == b"\x1f\x8b":  # aiohttp may already have undone Content-Encoding: gzip
            raw = gzip.decompress(raw)
        message = ExportTraceServiceRequest.FromString(raw)
        for resource_spans in message.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append({
                        "trace_id": span.trace_id.hex(),
                        "span_id": span.span_id.hex(),
                        "parent_id": span.parent_span_id.hex(),
                        "name": span.name,
                        "kind": span.kind,
                        "attributes": {a.key: _any_value(a.value) for a in span.attributes},
                    })
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")

    def alerts(self, source: str, alertname: str, **labels: str) -> list[tuple[str, dict]]:
        """(payload status, alert) for every alert named ``alertname`` with ``labels`` posted by ``source``."""
        out = []
        for payload, _, _ in self.webhooks[source]:
            for alert in payload.get("alerts", []):
                got = alert.get("labels", {})
                if got.get("alertname") == alertname and all(got.get(k) == v for k, v in labels.items()):
                    out.append((alert.get("status"), alert))
        return out


def _any_value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _any_value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, kind) if kind else None


# -- Prometheus ----------------------------------------------------------------------------------------------------


class QueryError(AssertionError):
    """Prometheus answered a query with an error."""


@dataclass
class Prometheus:
    """``/api/v1`` of one Prometheus server."""

    http: aiohttp.ClientSession
    base: str

    async def _get(self, path: str, **params: str) -> dict:
        async with self.http.get(f"{self.base}{path}", params=params) as resp:
            body = await resp.json(content_type=None)
        if body.get("status") != "success":
            raise QueryError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    async def query(self, expr: str) -> list[dict]:
        """Instant query at now: the result vector (a scalar comes back as one unlabelled sample)."""
        data = await self._get("/api/v1/query", query=expr)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        if data["resultType"] not in ("vector", "matrix"):
            raise QueryError(f"{expr!r}: expected a vector, got {data['resultType']}")
        return data["result"]

    async def value(self, expr: str) -> float | None:
        """The single value of ``expr``, None when it has no series."""
        result = await self.query(expr)
        if not result:
            return None
        assert len(result) == 1, f"{expr!r} returned {len(result)} series, expected one: {result}"
        return float(result[0]["value"][1])

    async def label_values(self, label: str, metric: str) -> list[str]:
        return await self._get(f"/api/v1/label/{label}/values", **{"match[]": metric})

    async def rules(self) -> list[dict]:
        data = await self._get("/api/v1/rules")
        return [rule for group in data["groups"] for rule in group["rules"]]


def finite(samples: list[dict]) -> list[dict]:
    """The samples of a result vector whose value is a number (not NaN, not infinite)."""
    return [s for s in samples if math.isfinite(float(s["value"][1]))]
