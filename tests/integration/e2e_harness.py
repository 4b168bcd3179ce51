"""The machinery of the end-to-end test: ports and configurations for the child processes, a receiver for
webhooks and forwarded spans, polling at the stack's pace, and a thin Prometheus query client (processes,
receivers and polling themselves come from ``support``).

Nothing here fakes a component: the orchestrator, the sidecar, Prometheus and Alertmanager are the real
programs, started as child processes and stopped by PID. The receiver stands where an operator's webhook
subscriber and tracing backend would be, and only records what reaches it.
"""

from __future__ import annotations

import asyncio
import importlib.util
import math
import os
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import yaml
from support.ports import free_ports
from support.procs import ALERTMANAGER, PROMETHEUS
from support.receiver import OtlpReceiver, RecordingServer, WebhookReceiver
from support.waiting import apoll

ROOT = Path(__file__).resolve().parents[2]
RULES_FILE = ROOT / "dashboards" / "prometheus" / "rules" / "muai-alerts.yml"
MISSING_BINARIES = ", ".join(
    name for name, path in (("prometheus", PROMETHEUS), ("prometheus-alertmanager", ALERTMANAGER)) if path is None
)


def load_dashboards_build() -> ModuleType:
    """``dashboards/build.py``, imported by path (``dashboards/`` is not a Python package)."""
    spec = importlib.util.spec_from_file_location("muai_dashboards_build_e2e", ROOT / "dashboards" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Connection errors while a component starts or restarts mean "not yet", not a failure.
RETRIED = (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError)


async def wait_for(
    condition: Callable[[], Any | Awaitable[Any]],
    *,
    timeout: float,
    interval: float = 0.25,
    what: str = "condition",
    diagnose: Callable[[], str] | None = None,
) -> Any:
    """:func:`support.waiting.apoll` at the stack's pace: a quarter second between tries, :data:`RETRIED` retried.

    ``diagnose`` adds context (process logs, the last answer seen) to the failure message.
    """
    return await apoll(condition, timeout=timeout, interval=interval, what=what, retry_on=RETRIED, diagnose=diagnose)


# -- processes ---------------------------------------------------------------------------------------------------


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


# -- the receiver: webhooks and forwarded spans -------------------------------------------------------------------


class Receiver:
    """Stands where the operator's webhook subscriber and tracing backend would be, on one port: Alertmanager's
    webhook posts (``/alertmanager``), the sidecar's webhook sink (``/sidecar``) and the span batches the sidecar
    forwards (``/v1/traces``, OTLP/HTTP protobuf)."""

    def __init__(self) -> None:
        self.webhooks = {"alertmanager": WebhookReceiver(), "sidecar": WebhookReceiver()}
        self.traces = OtlpReceiver()
        self._server = RecordingServer({
            "/alertmanager": self.webhooks["alertmanager"].handle,
            "/sidecar": self.webhooks["sidecar"].handle,
            "/v1/traces": self.traces.handle,
        })

    async def start(self, port: int) -> None:
        await self._server.start(port)

    async def stop(self) -> None:
        await self._server.stop()

    @property
    def spans(self) -> list[dict[str, Any]]:
        """Every forwarded span as a dict (hex ids, name, kind, attributes)."""
        return self.traces.records()

    def alerts(self, source: str, alertname: str, **labels: str) -> list[tuple[str, dict]]:
        """(payload status, alert) for every alert named ``alertname`` with ``labels`` posted by ``source``."""
        return self.webhooks[source].alerts(alertname, **labels)


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
