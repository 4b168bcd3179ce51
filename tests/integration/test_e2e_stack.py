"""The whole stack end to end, the way an operator deploys it (issue 8).

One stack for the module: the sidecar and the orchestrator (``python -m muai sidecar|serve`` on one YAML file,
the embedded tiny-llama and all-MiniLM-L6-v2 on the torch engine, tracing into the sidecar), a real Prometheus
scraping both every second with the shipped alert rules, a real Alertmanager, and a receiver standing in for
the operator's webhook subscriber and tracing backend. Mixed load (chat, streamed chat, completions,
embeddings, workflows, a three-turn conversation) runs once; then:

1. every PromQL expression of every dashboard panel and every alert rule evaluates on that Prometheus, and the
   panels listed in ``MUST_HAVE_DATA`` return series with numbers;
2. a workflow's spans reach the sidecar (its request and both models' inference samples), and the sidecar
   forwards the trace with its tree intact (request -> workflow -> steps -> inference);
3. the sidecar's p95 agrees with Prometheus's ``histogram_quantile`` over the orchestrator's histogram within
   the bucket that holds it;
4. an injected slowdown (``PATCH /admin/config``) fires the sidecar's latency alert, which reaches Alertmanager
   and the webhooks, and resolves once the delay is gone.

Run it alone: ``.venv/bin/python -m pytest -q -p no:cacheprovider tests/integration -m integration``
(docs/e2e.md). It skips only when the ``prometheus`` or ``prometheus-alertmanager`` binaries are missing.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import re
import secrets
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
import yaml

from alerting import SIGNATURE_HEADER, verify_signature
from e2e_harness import (
    MISSING_BINARIES,
    RULES_FILE,
    Ports,
    Prometheus,
    QueryError,
    Receiver,
    child_env,
    finite,
    load_dashboards_build,
    muai_argv,
    prometheus_config,
    wait_for,
    write_yaml,
)
from support.procs import Process, alertmanager_config, alertmanager_process, prometheus_process

pytestmark = [
    pytest.mark.integration,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.timeout(300),
    pytest.mark.skipif(
        bool(MISSING_BINARIES),
        reason=f"not installed: {MISSING_BINARIES} (Debian packages prometheus and prometheus-alertmanager; "
               "scripts/bootstrap.sh installs them)",
    ),
]

GEN_MODEL = "tiny-llama"
EMBED_MODEL = "minilm"
ADMIN_TOKEN = "e2e-admin-token-" + secrets.token_hex(8)
WEBHOOK_SECRET = "e2e-webhook-secret"

# The slowdown drill: the sidecar judges p95 over its 10 s window; a delay of twice the threshold crosses it
# whatever the machine's own speed (tiny-llama answers in tens of milliseconds), and the 10 s window forgets
# the slow requests soon after the delay is removed.
DETECTOR_WINDOW = "10s"
LATENCY_THRESHOLD_S = 1.0
INJECTED_DELAY_S = 2.0
ALERT = "HighRequestLatency"

# 21 embedding requests: with n - 1 a multiple of 20, numpy's linear p95 (the sidecar's) is exactly the 20th
# smallest latency, the same observation whose bucket Prometheus's histogram_quantile lands in (rank 0.95 n).
EMBEDDING_REQUESTS = 21
# The sidecar times the request's SERVER span, which also covers parsing the body before admission; the
# histogram starts at admission. Its p95 may lie above the histogram's bucket by that much, never below it.
PARSE_SLACK_S = 0.01

# Panels that must show numbers after the load, as (dashboard uid, panel title) -> the refIds of its targets
# that must return at least one series with a finite value. Everything else only has to evaluate: GPU panels
# (no GPU here), fallbacks (one engine), rejections other than 404s, vLLM's prefix cache, detector scores
# (statistical detectors off), alert transitions and suppressions (none yet) may legitimately be empty.
MUST_HAVE_DATA: dict[tuple[str, str], str] = {
    # Service overview: traffic, errors, latency, tokens, saturation.
    ("muai-overview", "Requests/s"): "A",
    ("muai-overview", "Error ratio"): "A",
    ("muai-overview", "p95 latency"): "A",
    ("muai-overview", "Models loaded"): "A",
    ("muai-overview", "Requests/s by model and operation"): "A",
    ("muai-overview", "Requests/s by status"): "A",
    ("muai-overview", "Error ratio by model and operation"): "A",
    ("muai-overview", "Tokens/s"): "AB",
    ("muai-overview", "End-to-end latency"): "ABC",
    ("muai-overview", "Time to first token"): "ABC",
    ("muai-overview", "Time per output token"): "ABC",
    ("muai-overview", "Queue wait"): "ABC",
    ("muai-overview", "Queue depth"): "AB",
    ("muai-overview", "Rejected requests/s by reason"): "A",
    ("muai-overview", "Orchestrator CPU"): "A",
    ("muai-overview", "Completed requests/s (last 60 s)"): "A",
    # Engines and models.
    ("muai-engines", "p95 latency by engine and model"): "A",
    ("muai-engines", "p50 latency by engine and model"): "A",
    ("muai-engines", "Requests/s by engine and model"): "A",
    ("muai-engines", "Generated tokens/s by engine and model"): "A",
    ("muai-engines", "Loaded models"): "A",
    ("muai-engines", "Model lifecycle events"): "A",
    ("muai-engines", "Mean model load time"): "A",
    ("muai-engines", "Mean batch size"): "A",
    ("muai-engines", "Batch size percentiles"): "AB",
    ("muai-engines", "Batch size distribution"): "A",
    ("muai-engines", "Batch executions/s"): "A",
    ("muai-engines", "Cache hit rates"): "A",
    ("muai-engines", "KV cache memory"): "A",
    ("muai-engines", "KV cache entries"): "A",
    # GPUs and host: the host half (this machine has no GPU to show).
    ("muai-gpu-host", "Host CPU"): "A",
    ("muai-gpu-host", "Host memory"): "ABC",
    ("muai-gpu-host", "Host memory used %"): "A",
    ("muai-gpu-host", "Orchestrator CPU"): "AB",
    ("muai-gpu-host", "Orchestrator resident memory (RSS)"): "AB",
    ("muai-gpu-host", "Sidecar's view"): "AB",
    # Sidecar and alerts.
    ("muai-sidecar-alerts", "Spans/s"): "ABCD",
    ("muai-sidecar-alerts", "OTLP export requests/s"): "A",
    ("muai-sidecar-alerts", "Forwarding to the tracing backend"): "ABC",
    ("muai-sidecar-alerts", "Latency p95 per series"): "A",
    ("muai-sidecar-alerts", "Latency p50 / p99 per series"): "AB",
    ("muai-sidecar-alerts", "Error ratio per series"): "A",
    ("muai-sidecar-alerts", "Throughput per series"): "AB",
    ("muai-sidecar-alerts", "Time to first token p95 per series"): "A",
    ("muai-sidecar-alerts", "Inference latency p95 per series"): "A",
    ("muai-sidecar-alerts", "Tokens/s per series"): "AB",
    ("muai-sidecar-alerts", "Requests in window"): "A",
    ("muai-sidecar-alerts", "Alerts firing"): "A",
    ("muai-sidecar-alerts", "Alerts pending"): "A",
    ("muai-sidecar-alerts", "Prometheus alerts firing"): "A",
    ("muai-sidecar-alerts", "Requests seen by the sidecar"): "A",
}

# Template variables whose values a user must find in the drop-down: (dashboard uid, variable name).
MUST_HAVE_VALUES = {
    ("muai-overview", "model"),
    ("muai-engines", "model"),
    ("muai-engines", "engine"),
    ("muai-gpu-host", "instance"),
    ("muai-sidecar-alerts", "window"),
    ("muai-sidecar-alerts", "model"),
}


# -- the stack -----------------------------------------------------------------------------------------------------


def muai_config(ports: Ports, tmp: Path) -> dict:
    """The one YAML file both processes read (keys: docs/configuration.md)."""
    pid_file = str(tmp / "orchestrator.pid")
    return {
        "engines": {"preference": ["torch"], "torch": {"threads": 1}},
        "models": [
            {"name": GEN_MODEL, "path": "builtin:tiny-llama", "task": "generate"},
            {"name": EMBED_MODEL, "path": "builtin:all-minilm-l6-v2", "task": "embed"},
        ],
        "server": {
            "host": "127.0.0.1", "port": ports.orchestrator, "admin_token": ADMIN_TOKEN, "pid_file": pid_file,
            "drain_timeout_s": 5,
        },
        "telemetry": {
            "metrics": {"resource_interval_s": 1},
            "tracing": {"endpoint": f"{ports.url('sidecar')}/v1/traces", "sampling_ratio": 1.0},
        },
        "sidecar": {
            "host": "127.0.0.1",
            "port": ports.sidecar,
            "shutdown_timeout_s": 5,
            "collectors": {"interval_s": 1, "orchestrator": {"pid_file": pid_file, "url": ports.url("orchestrator")}},
            # The receiver stands in for the tracing backend, so the span tree can be checked after the sidecar.
            "forwarding": {"endpoint": f"{ports.url('receiver')}/v1/traces"},
            "detectors": {
                "interval_s": 0.5,
                "window": DETECTOR_WINDOW,
                "latency": {"quantile": "p95", "threshold_s": LATENCY_THRESHOLD_S, "for_s": 2, "min_count": 3},
                # Only the threshold rule is drilled here; the statistical detectors have their own tests.
                "statistical": {"ewma": {"enabled": False}, "mad": {"enabled": False}},
            },
            "alerting": {
                "sinks": {
                    "webhook": {"url": f"{ports.url('receiver')}/sidecar", "secret": WEBHOOK_SECRET, "retries": 2},
                    "alertmanager": {"url": ports.url("alertmanager"), "resend_interval_s": 2, "retries": 2},
                },
                "rate_limit": {
                    "group_by": ["alertname", "model", "operation"], "group_wait_s": 0.5, "group_interval_s": 1,
                    "repeat_interval_s": 3600, "rate_per_s": 5, "burst": 20,
                },
            },
        },
    }


@dataclass
class Stack:
    """The running stack: where everything listens, the processes, the receiver, an HTTP session."""

    ports: Ports
    tmp: Path
    http: aiohttp.ClientSession
    receiver: Receiver
    processes: dict[str, Process] = field(default_factory=dict)

    @property
    def prometheus(self) -> Prometheus:
        return Prometheus(self.http, self.ports.url("prometheus"))

    def url(self, name: str, path: str = "") -> str:
        return self.ports.url(name) + path

    def diagnose(self) -> str:
        return "\n".join(p.describe() for p in self.processes.values())

    def check_alive(self) -> None:
        dead = [p for p in self.processes.values() if not p.alive()]
        if dead:
            raise AssertionError("a process of the stack exited:\n" + "\n".join(p.describe() for p in dead))

    async def get_json(self, name: str, path: str, **params: str) -> Any:
        async with self.http.get(self.url(name, path), params=params) as resp:
            assert resp.status == 200, f"GET {name}{path} {params}: {resp.status} {await resp.text()}"
            return await resp.json(content_type=None)

    async def status(self, name: str, path: str) -> int:
        self.check_alive()
        async with self.http.get(self.url(name, path)) as resp:
            await resp.read()
            return resp.status

    async def post(self, path: str, body: dict, *, headers: dict | None = None, expect: int = 200) -> Any:
        """POST to the orchestrator; the answer's JSON (or text, when streamed)."""
        async with self.http.post(self.url("orchestrator", path), json=body, headers=headers) as resp:
            text = await resp.text()
            assert resp.status == expect, f"POST {path}: {resp.status} (expected {expect}): {text[:500]}"
            if resp.content_type == "text/event-stream":
                return text
            return await resp.json(content_type=None)

    async def patch_config(self, patch: dict) -> tuple[int, Any]:
        async with self.http.patch(
            self.url("orchestrator", "/admin/config"), json=patch, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
        ) as resp:
            return resp.status, await resp.json(content_type=None)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    tmp = tmp_path_factory.mktemp("e2e")
    ports = Ports.allocate()
    receiver = Receiver()
    config_path = write_yaml(tmp / "muai.yaml", muai_config(ports, tmp))
    prom_config = write_yaml(tmp / "prometheus.yml", prometheus_config(ports))
    # One webhook receiver, notified at once and again a second after any change (resolutions included).
    am_config = write_yaml(tmp / "alertmanager.yml", alertmanager_config(
        f"{ports.url('receiver')}/alertmanager", receiver="e2e-hook", group_by=("alertname", "model", "operation"),
    ))
    # Exporters batch spans for 5 s by default: a shorter delay gets them to the sidecar while the test waits.
    orchestrator_env = child_env(OTEL_BSP_SCHEDULE_DELAY="100")
    processes = {
        "sidecar": Process("sidecar", muai_argv("sidecar", config_path), tmp / "sidecar.log", env=child_env()),
        "orchestrator": Process("orchestrator", muai_argv("serve", config_path), tmp / "orchestrator.log",
                                env=orchestrator_env),
        "prometheus": prometheus_process(prom_config, tmp, port=ports.prometheus, log_level="warn"),
        "alertmanager": alertmanager_process(am_config, tmp, port=ports.alertmanager, log_level="warn"),
    }
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        s = Stack(ports, tmp, http, receiver, processes)
        try:
            await receiver.start(ports.receiver)
            for process in processes.values():
                process.start()

            async def up(name: str, path: str, timeout: float) -> None:
                await wait_for(lambda: _is(s.status(name, path), 200), timeout=timeout, interval=0.25,
                               what=f"{name} {path} to answer 200", diagnose=s.diagnose)

            # They all start at once; waiting for them in turn costs nothing more. The orchestrator loads both
            # models before readiness turns 200 (the first run on a checkout also builds tiny-llama).
            await up("sidecar", "/health", 60)
            await up("prometheus", "/-/ready", 60)
            await up("alertmanager", "/-/ready", 60)
            await up("orchestrator", "/health/ready", 180)
            await wait_for(lambda: _targets_up(s), timeout=60, what="Prometheus to scrape both targets",
                           diagnose=s.diagnose)
            yield s
        finally:
            # Reverse start order: the orchestrator drains and flushes its spans while the sidecar still listens.
            for process in reversed(processes.values()):
                process.stop(timeout=20.0)
            await receiver.stop()


async def _is(status, expected: int) -> bool:
    return (await status) == expected


async def _targets_up(s: Stack) -> bool:
    s.check_alive()
    result = await s.prometheus.query('up{job=~"muai-orchestrator|muai-sidecar"} == 1')
    return {r["metric"]["job"] for r in result} == {"muai-orchestrator", "muai-sidecar"}


# -- the load --------------------------------------------------------------------------------------------------------


@dataclass
class Load:
    """What the load sent: requests the orchestrator admitted, per (model label, operation)."""

    admitted: Counter = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.admitted.values())


def chat_body(content: str, *, stream: bool = False, **extra: Any) -> dict:
    return {"model": GEN_MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 8,
            "temperature": 0, "stream": stream, **extra}


async def _chat(s: Stack, load: Load, content: str) -> None:
    body = await s.post("/v1/chat/completions", chat_body(content))
    assert body["choices"][0]["message"]["role"] == "assistant" and body["usage"]["completion_tokens"] > 0
    load.admitted[(GEN_MODEL, "chat")] += 1


async def _stream(s: Stack, load: Load, content: str) -> None:
    text = await s.post("/v1/chat/completions", chat_body(content, stream=True))
    assert text.rstrip().endswith("data: [DONE]"), text[-300:]
    load.admitted[(GEN_MODEL, "chat")] += 1


async def _completion(s: Stack, load: Load, prompt: str) -> None:
    body = await s.post("/v1/completions", {"model": GEN_MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0})
    assert body["object"] == "text_completion" and body["choices"]
    load.admitted[(GEN_MODEL, "text_completion")] += 1


async def _embed(s: Stack, load: Load, texts: list[str]) -> None:
    body = await s.post("/v1/embeddings", {"model": EMBED_MODEL, "input": texts})
    assert len(body["data"]) == len(texts) and len(body["data"][0]["embedding"]) == 384
    load.admitted[(EMBED_MODEL, "embeddings")] += 1


async def _workflow(s: Stack, load: Load, name: str, parameters: dict, headers: dict | None = None) -> dict:
    body = await s.post(f"/v1/workflows/{name}", {"parameters": parameters}, headers=headers)
    assert body["status"] == "success", body
    load.admitted[(name, "workflow")] += 1
    return body


def rag_parameters(query: str) -> dict:
    return {"query": query, "documents": ["GPUs run kernels.", "Prometheus scrapes targets.", "Cats sleep."],
            "top_k": 1, "max_new_tokens": 6}


async def _conversation(s: Stack, load: Load, cid: str, turns: list[str]) -> None:
    """Turns of one conversation: each request carries the whole history and the conversation id."""
    messages: list[dict] = []
    for turn in turns:
        messages.append({"role": "user", "content": turn})
        body = await s.post("/v1/chat/completions", {"model": GEN_MODEL, "messages": messages, "max_tokens": 6,
                                                      "temperature": 0, "conversation_id": cid})
        messages.append({"role": "assistant", "content": body["choices"][0]["message"]["content"]})
        load.admitted[(GEN_MODEL, "chat")] += 1


async def sidecar_request_totals(s: Stack) -> dict[tuple[str, str, str], int]:
    """(scope, model, operation) -> requests the sidecar has counted since it started."""
    body = await s.get_json("sidecar", "/api/v1/stats", scope="all", window="5m")
    return {(st["scope"], st["model"], st["operation"]): st["totals"]["requests"] for st in body["stats"]}


async def _settled(s: Stack, load: Load) -> bool:
    """Both pipelines have every admitted request: Prometheus's scrape of the orchestrator, the sidecar's spans,
    and Prometheus's scrape of the sidecar."""
    s.check_alive()
    prom = s.prometheus
    if await prom.value("sum(muai_requests_total)") != load.total:
        return False
    totals = await sidecar_request_totals(s)
    seen = Counter({(m, op): n for (scope, m, op), n in totals.items() if scope == "request"})
    if seen != load.admitted:
        return False
    return await prom.value("sum(muai_sidecar_requests_total)") == load.total


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def load(stack: Stack) -> Load:
    """A few dozen mixed requests, then wait until Prometheus and the sidecar have all of them."""
    s, record = stack, Load()
    # One of each first, scraped before the rest: a counter that appears with its final value has no rate,
    # so every series must exist in Prometheus before the traffic that the rate panels show.
    await _chat(s, record, "Hello there")
    await _stream(s, record, "Stream me a story")
    await _completion(s, record, "Once upon a time")
    await _embed(s, record, ["warm-up sentence", "another one"])
    await _workflow(s, record, "embed_then_generate", rag_parameters("What scrapes targets?"))
    await _workflow(s, record, "chat", {"prompt": "Say hi", "max_new_tokens": 6})
    await s.post("/v1/chat/completions", {**chat_body("x"), "model": "no-such-model"}, expect=404)
    await wait_for(lambda: _settled(s, record), timeout=60, what="the warm-up requests in Prometheus and the sidecar",
                   diagnose=s.diagnose)

    # The main round.
    await _conversation(s, record, "e2e-conversation-1", ["My name is Ada.", "What is my name?", "Thanks!"])
    for i in range(EMBEDDING_REQUESTS - 1):
        await _embed(s, record, [f"sentence number {i}", "the same second sentence"])
    for start in range(0, 12, 4):  # concurrent, so the dynamic batcher forms batches
        await asyncio.gather(*(_chat(s, record, f"Question {i}?") for i in range(start, start + 4)))
    await asyncio.gather(_stream(s, record, "Another stream"), _stream(s, record, "And one more"))
    await _completion(s, record, "The quick brown fox")
    await _workflow(s, record, "embed_then_generate", rag_parameters("What runs kernels?"))
    await _workflow(s, record, "chat", {"messages": [{"role": "user", "content": "Hi"}], "max_new_tokens": 6})
    await s.post("/v1/embeddings", {"model": "no-such-model", "input": ["x"]}, expect=404)
    await wait_for(lambda: _settled(s, record), timeout=60, what="every request in Prometheus and the sidecar",
                   diagnose=s.diagnose)
    assert record.admitted[(EMBED_MODEL, "embeddings")] == EMBEDDING_REQUESTS
    return record


# -- 1. dashboards and rules on a real Prometheus ------------------------------------------------------------------


@dataclass(frozen=True)
class PanelQuery:
    uid: str
    title: str
    ref: str
    expr: str


def panel_queries() -> list[PanelQuery]:
    build = load_dashboards_build()
    out = []
    for dashboard in build.build_all().values():
        for panel in build.iter_panels(dashboard):
            for target in panel.get("targets", []):
                expr = build.render_expr(target["expr"], rate_interval="1m", values={"window": "1m"})
                out.append(PanelQuery(dashboard["uid"], panel["title"], target["refId"], expr))
    return out


async def test_every_dashboard_panel_evaluates_and_the_busy_ones_have_data(stack: Stack, load: Load) -> None:
    queries = panel_queries()
    assert len(queries) > 50
    known = {(q.uid, q.title) for q in queries}
    assert not set(MUST_HAVE_DATA) - known, f"MUST_HAVE_DATA names panels that no longer exist: {set(MUST_HAVE_DATA) - known}"
    prom = stack.prometheus

    async def run(q: PanelQuery) -> tuple[PanelQuery, list[dict] | str]:
        try:
            return q, await prom.query(q.expr)
        except QueryError as exc:
            return q, str(exc)

    results = await asyncio.gather(*(run(q) for q in queries))
    errors = [f"{q.uid} / {q.title} / {q.ref}: {r}" for q, r in results if isinstance(r, str)]
    assert not errors, "PromQL errors:\n" + "\n".join(errors)

    # The panels' rates look back one minute, and the tests before this one may have taken longer than that since
    # the fixture's load (CI once found the cache hit rate NaN: no lookup in the last minute). Two more turns of a
    # conversation, the second a cache hit, keep the engine's cache counters inside the window.
    await _conversation(stack, load, "e2e-dashboards", ["My name is Grace.", "What is my name?"])
    # Samplers (engine cache statistics, host gauges) report on their own ticks: give the last of them a few
    # scrapes to arrive, well inside the 1m rate windows.
    by_key = {(q.uid, q.title, q.ref): q for q in queries}
    wanted = [by_key[(uid, title, ref)] for (uid, title), refs in MUST_HAVE_DATA.items() for ref in refs]
    last: dict[PanelQuery, list[dict]] = {}

    async def all_have_data() -> bool:
        pending = [q for q in wanted if not finite(last.get(q, []))]
        for q, result in zip(pending, await asyncio.gather(*(prom.query(q.expr) for q in pending))):
            last[q] = result
        return all(finite(last[q]) for q in wanted)

    def report() -> str:
        return "panels without data after the load:\n" + "\n".join(
            f"{q.uid} / {q.title} / {q.ref}: {q.expr}  ->  {last.get(q)}" for q in wanted if not finite(last.get(q, []))
        )

    await wait_for(all_have_data, timeout=30, interval=1, what="the listed panels to show data", diagnose=report)


async def test_every_alert_rule_evaluates_on_prometheus(stack: Stack, load: Load) -> None:
    rules = [rule for group in yaml.safe_load(RULES_FILE.read_text())["groups"] for rule in group["rules"]]
    assert rules
    prom = stack.prometheus
    errors = []
    for rule in rules:
        try:
            await prom.query(rule["expr"])
        except QueryError as exc:
            errors.append(f"{rule['alert']}: {exc}")
    assert not errors, "\n".join(errors)

    # Prometheus loaded the same file and evaluates every rule without error.
    async def all_evaluated() -> list[dict] | None:
        loaded = await prom.rules()
        return loaded if all(r.get("health") == "ok" for r in loaded) and len(loaded) == len(rules) else None

    loaded = await wait_for(all_evaluated, timeout=30, what="Prometheus to evaluate every rule")
    assert sorted(r["name"] for r in loaded) == sorted(r["alert"] for r in rules)


_LABEL_VALUES = re.compile(r"^label_values\((?P<metric>[^,]+),\s*(?P<label>\w+)\)$")


async def test_dashboard_variables_offer_values(stack: Stack, load: Load) -> None:
    build = load_dashboards_build()
    prom = stack.prometheus
    missing = []
    for dashboard in build.build_all().values():
        variables = [var for var in dashboard["templating"]["list"] if var["type"] == "query"]
        for var, query in zip(variables, build.variable_queries(dashboard), strict=True):
            match = _LABEL_VALUES.match(query)
            assert match, f"{dashboard['uid']}: variable {var['name']} is not label_values(metric, label)"
            values = await prom.label_values(match["label"], match["metric"])
            if (dashboard["uid"], var["name"]) in MUST_HAVE_VALUES and not values:
                missing.append(f"{dashboard['uid']}: ${var['name']} = {query}")
    assert not missing, "variables with no values:\n" + "\n".join(missing)
    window = await prom.label_values("window", "muai_sidecar_latency_seconds")
    assert "1m" in window and DETECTOR_WINDOW in window


# -- 2. a workflow's spans through the sidecar ------------------------------------------------------------------------

WORKFLOW_RUNS = 2


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def traced_workflows(stack: Stack, load: Load) -> dict[str, Any]:
    """Run the two-model workflow with known trace ids (W3C traceparent) on an otherwise idle stack, and note what
    the sidecar counted before and after."""
    # Tests before this one sent requests of their own (the dashboard test two conversation turns): their spans
    # must have landed before the count is taken, or one arriving late reads as this test's.
    await wait_for(lambda: _settled(stack, load), timeout=60, what="the earlier requests in Prometheus and the sidecar",
                   diagnose=stack.diagnose)
    before = await sidecar_request_totals(stack)
    traces = {}
    for _ in range(WORKFLOW_RUNS):
        trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
        await _workflow(stack, load, "embed_then_generate", rag_parameters("Which one sleeps?"),
                        headers={"traceparent": f"00-{trace_id}-{parent_id}-01"})
        traces[trace_id] = parent_id

    async def counted() -> dict | None:
        after = await sidecar_request_totals(stack)
        changed = {k: after.get(k, 0) - before.get(k, 0) for k in after.keys() | before.keys()}
        return after if changed.get(("request", "embed_then_generate", "workflow")) == WORKFLOW_RUNS else None

    after = await wait_for(counted, timeout=30, what="the sidecar to count the workflow requests", diagnose=stack.diagnose)
    return {"before": before, "after": after, "traces": traces}


async def test_workflow_spans_reach_the_sidecar(stack: Stack, traced_workflows: dict) -> None:
    before, after = traced_workflows["before"], traced_workflows["after"]
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after.keys() | before.keys()}
    delta = {k: v for k, v in delta.items() if v}
    # One request sample per workflow, and below it one inference sample per model it used: the embedding
    # model ranks the documents, the generator answers. Nothing else ran meanwhile.
    assert {k: v for k, v in delta.items() if k[0] == "request"} == {("request", "embed_then_generate", "workflow"): WORKFLOW_RUNS}
    inference = Counter()
    for (scope, model, _operation), n in delta.items():
        if scope == "inference":
            inference[model] += n
    assert inference == {EMBED_MODEL: WORKFLOW_RUNS, GEN_MODEL: WORKFLOW_RUNS}, delta
    assert ("inference", EMBED_MODEL, "embeddings") in delta

    stats = await stack.get_json("sidecar", "/api/v1/stats", model="embed_then_generate", operation="workflow", window="5m")
    (workflow,) = stats["stats"]
    assert workflow["scope"] == "request" and workflow["errors"] == 0 and workflow["latency_s"]["p95"] > 0


async def test_workflow_trace_is_forwarded_with_its_tree(stack: Stack, traced_workflows: dict) -> None:
    traces: dict[str, str] = traced_workflows["traces"]
    receiver = stack.receiver

    def spans_of(trace_id: str) -> list[dict]:
        return [sp for sp in receiver.spans if sp["trace_id"] == trace_id]

    def complete() -> bool:
        # request + workflow + 3 steps + 2 inferences (HTTP-level spans, if any, come on top)
        return all(
            sum(1 for sp in spans_of(t) if "gen_ai.operation.name" in sp["attributes"]) >= 3
            and sum(1 for sp in spans_of(t) if sp["name"].startswith("workflow.step")) >= 3
            for t in traces
        )

    await wait_for(complete, timeout=30, what="the sidecar to forward both workflow traces",
                   diagnose=lambda: f"forwarded spans: {[(s['trace_id'], s['name']) for s in receiver.spans][-40:]}")
    for trace_id, remote_parent in traces.items():
        spans = {sp["span_id"]: sp for sp in spans_of(trace_id)}
        (root,) = [sp for sp in spans.values() if sp["parent_id"] == remote_parent]
        # The request span continues the caller's trace and is what the sidecar counts as the request.
        assert root["kind"] == 2  # SPAN_KIND_SERVER
        assert root["attributes"]["gen_ai.operation.name"] == "workflow"
        assert root["attributes"]["muai.workflow"] == "embed_then_generate"

        def ancestors(span: dict) -> list[dict]:
            chain = []
            while span["parent_id"] in spans:
                span = spans[span["parent_id"]]
                chain.append(span)
            return chain

        steps = {sp["attributes"]["muai.workflow.step"]: sp for sp in spans.values()
                 if "muai.workflow.step" in sp["attributes"]}
        assert set(steps) == {"embed", "retrieve", "generate"}
        for step in steps.values():
            assert ancestors(step)[-1] is root, f"step {step['name']} is not under the request span"
        inferences = [sp for sp in spans.values() if sp is not root and "gen_ai.operation.name" in sp["attributes"]]
        models = {sp["attributes"].get("gen_ai.request.model"): sp for sp in inferences}
        assert set(models) == {EMBED_MODEL, GEN_MODEL}, [sp["attributes"] for sp in inferences]
        # Each model's inference sits under its own step: the batcher carried the context across its queue.
        assert spans.get(models[EMBED_MODEL]["parent_id"]) is steps["embed"]
        assert spans.get(models[GEN_MODEL]["parent_id"]) is steps["generate"]
        for sp in inferences:
            assert ancestors(sp)[-1] is root


# -- 3. the sidecar's p95 and Prometheus's histogram_quantile ------------------------------------------------------


async def test_sidecar_p95_agrees_with_prometheus_histogram_quantile(stack: Stack, load: Load) -> None:
    prom = stack.prometheus
    selector = f'muai_request_latency_seconds_bucket{{model="{EMBED_MODEL}"}}'
    # Cumulative buckets, not rate(): the same set of requests the sidecar's 5m window holds (every one so far).
    count = await prom.value(f'sum(muai_request_latency_seconds_count{{model="{EMBED_MODEL}"}})')
    assert count == EMBEDDING_REQUESTS
    buckets = sorted(
        ((float(r["metric"]["le"]), float(r["value"][1])) for r in await prom.query(f"sum by (le) ({selector})")),
    )
    prom_p95 = await prom.value(f"histogram_quantile(0.95, sum by (le) ({selector}))")

    stats = await stack.get_json("sidecar", "/api/v1/stats", model=EMBED_MODEL, operation="embeddings", window="5m")
    (series,) = stats["stats"]
    assert series["requests"] == EMBEDDING_REQUESTS and series["error_bound"] == 0.0
    sidecar_p95 = series["latency_s"]["p95"]

    # The bucket Prometheus's estimate comes from: the first whose cumulative count reaches rank 0.95 n.
    rank = 0.95 * count
    index = next(i for i, (_, cumulative) in enumerate(buckets) if cumulative >= rank)
    upper = buckets[index][0]
    lower = buckets[index - 1][0] if index else 0.0
    assert math.isfinite(upper), f"p95 lies beyond the largest bucket: {buckets}"
    assert lower <= prom_p95 <= upper
    assert lower < sidecar_p95 <= upper + PARSE_SLACK_S, (
        f"sidecar p95 {sidecar_p95:.4f}s is outside Prometheus's bucket ({lower}, {upper}] "
        f"(histogram_quantile {prom_p95:.4f}s; buckets {buckets})"
    )


# -- 4. an injected slowdown fires an alert end to end, and it resolves -------------------------------------------------


async def _traffic(s: Stack, stop: asyncio.Event, concurrency: int, prefix: str) -> int:
    """Chat requests, ``concurrency`` at a time, until ``stop``; how many were sent."""
    sent = 0
    for n in itertools.count():
        if stop.is_set():
            return sent
        await asyncio.gather(*(
            s.post("/v1/chat/completions", {**chat_body(f"{prefix} {n}.{i}"), "max_tokens": 4})
            for i in range(concurrency)
        ))
        sent += concurrency
    return sent


async def _sidecar_alert(s: Stack) -> tuple[dict | None, list[dict]]:
    """The sidecar's active HighRequestLatency alert for the chat series (or None), and its resolved history."""
    body = await s.get_json("sidecar", "/api/v1/alerts")

    def ours(alert: dict) -> bool:
        labels = alert["labels"]
        return labels.get("alertname") == ALERT and labels.get("model") == GEN_MODEL and labels.get("operation") == "chat"

    active = [a for a in body["active"] if ours(a)]
    return (active[0] if active else None), [a for a in body["history"] if ours(a)]


async def _alertmanager_alerts(s: Stack) -> list[dict]:
    alerts = await s.get_json("alertmanager", "/api/v2/alerts", active="true", silenced="false", inhibited="false")
    return [a for a in alerts
            if a["labels"].get("alertname") == ALERT and a["labels"].get("model") == GEN_MODEL]


async def test_injected_slowdown_fires_an_alert_that_reaches_alertmanager_and_resolves(stack: Stack, load: Load) -> None:
    s, receiver = stack, stack.receiver
    status, body = await s.patch_config({"models": {GEN_MODEL: {"inject_delay_s": INJECTED_DELAY_S}}})
    assert status == 200, body
    assert f"models.{GEN_MODEL}.inject_delay_s" in body["changed"]

    def diagnose() -> str:
        hooks = {name: [r.json() for r in hook.requests] for name, hook in receiver.webhooks.items()}
        return f"{s.diagnose()}\nalertmanager webhook: {hooks['alertmanager']}\nsidecar webhook: {hooks['sidecar']}"

    stop = asyncio.Event()
    slow = asyncio.create_task(_traffic(s, stop, concurrency=3, prefix="slow"))
    try:
        async def firing() -> dict | None:
            s.check_alive()
            if slow.done():
                slow.result()  # a failed request fails the test here
            alert, _ = await _sidecar_alert(s)
            return alert if alert and alert["state"] == "firing" else None

        alert = await wait_for(firing, timeout=90, interval=0.5, what=f"the sidecar's {ALERT} to fire",
                               diagnose=diagnose)
        value = float(alert["annotations"]["value"])
        assert value > LATENCY_THRESHOLD_S
        (am_alert,) = await wait_for(lambda: _alertmanager_alerts(s), timeout=30,
                                     what="the alert in Alertmanager's /api/v2/alerts", diagnose=diagnose)
        assert am_alert["status"]["state"] == "active"
        assert am_alert["labels"]["operation"] == "chat" and am_alert["labels"]["severity"] == "warning"
        assert am_alert["fingerprint"] == alert["fingerprint"]  # one identity in the sidecar and in Alertmanager
    finally:
        stop.set()
        await slow

    await wait_for(lambda: any(st == "firing" for st, _ in receiver.alerts("alertmanager", ALERT, model=GEN_MODEL)),
                   timeout=30, what="Alertmanager's webhook to deliver the firing alert", diagnose=diagnose)
    await wait_for(lambda: any(st == "firing" for st, _ in receiver.alerts("sidecar", ALERT, model=GEN_MODEL)),
                   timeout=30, what="the sidecar's webhook to deliver the firing alert", diagnose=diagnose)
    hit = next(r for r in receiver.webhooks["sidecar"].requests
               if any(a["labels"]["alertname"] == ALERT for a in r.json()["alerts"]))
    payload, raw, headers = hit.json(), hit.body, hit.headers
    assert payload["version"] == "4" and payload["status"] == "firing"
    assert verify_signature(WEBHOOK_SECRET, raw, headers.get(SIGNATURE_HEADER))
    # Prometheus sees it too, through the sidecar's own gauge (the "Alerts firing" panel).
    await wait_for(lambda: _at_least(s.prometheus.value("max(muai_sidecar_alerts_firing)"), 1), timeout=30,
                   what="Prometheus to scrape muai_sidecar_alerts_firing >= 1")

    # The drill is over: remove the delay and keep fast traffic flowing until everything says resolved.
    status, body = await s.patch_config({"models": {GEN_MODEL: {"inject_delay_s": 0.0}}})
    assert status == 200, body
    stop = asyncio.Event()
    fast = asyncio.create_task(_traffic(s, stop, concurrency=1, prefix="fast"))
    try:
        async def resolved() -> bool:
            s.check_alive()
            if fast.done():
                fast.result()
            alert, history = await _sidecar_alert(s)
            return alert is None and any(a["state"] == "resolved" for a in history)

        await wait_for(resolved, timeout=90, interval=0.5, what=f"the sidecar's {ALERT} to resolve", diagnose=diagnose)
        await wait_for(lambda: _none(_alertmanager_alerts(s)), timeout=30,
                       what="Alertmanager to show the alert resolved", diagnose=diagnose)
        await wait_for(lambda: any(st == "resolved" for st, _ in receiver.alerts("alertmanager", ALERT, model=GEN_MODEL)),
                       timeout=30, what="Alertmanager's webhook to deliver the resolution", diagnose=diagnose)
        await wait_for(lambda: any(st == "resolved" for st, _ in receiver.alerts("sidecar", ALERT, model=GEN_MODEL)),
                       timeout=30, what="the sidecar's webhook to deliver the resolution", diagnose=diagnose)
    finally:
        stop.set()
        await fast


async def _at_least(value, bound: float) -> bool:
    got = await value
    return got is not None and got >= bound


async def _none(alerts) -> bool:
    return not await alerts
