"""Serving while telemetry fails: the same load with the telemetry path healthy and with each of its parts down
(issue 15; requirements 15.4, 15.5, 10.5).

Four conditions, each a real orchestrator (`python -m muai serve`, the echo engine: the figures are the server's, not
a model's) with its own real sidecar (`python -m muai sidecar`) and the sidecar's alert sinks:

- **healthy**: the orchestrator exports spans to its sidecar over OTLP/HTTP; the sidecar's webhook sink posts to a
  local receiver that answers 200 and its Alertmanager sink to a real Alertmanager (when one is installed);
- **otlp_down**: the orchestrator exports to a closed port on 127.0.0.1 (connection refused on every export);
- **webhook_500**: the webhook receiver answers 500 to every notification;
- **alertmanager_down**: the sidecar's Alertmanager URL is a closed port;
- **healthy_control**: a second healthy pair, so the report shows how far two identical runs differ here
  (``noise_floor_control_vs_healthy``).

Alerts fire during the run: the sidecar's latency rule has a threshold of 1 µs (every request breaches it), no
``for`` duration, and a rate limit loose enough to notify every second, so the faulted sinks retry and give up over
and over. An aiohttp client keeps ``--connections`` connections busy (`POST /v1/completions`) against one orchestrator
at a time; the conditions alternate over ``--rounds`` rounds of ``--duration`` seconds after a warm-up (the order
rotated by one every round). Each condition's throughput is its median round; each ratio is the median over cycles of the
faulted round over the healthy round of the same cycle (a shared machine's load drifts between cycles far more than
within one). A condition's p99 is over all its measured requests.

- ``serving_under_telemetry_faults_vs_healthy`` = the worst faulted condition's req/s / healthy req/s (paired, as
  above), goal >= 0.9; ``<condition>_vs_healthy`` for each.
- Per condition: req/s, p50 and p99 latency; per condition the sidecar's own notification counters by sink
  (sent, failed, retried, dropped), the orchestrator's own span-drop and export-failure counters, the CPU seconds
  each process spent while its condition was loaded and while the others were, and the orchestrator's CPU
  microseconds per request (``serve_cpu_us_per_request``: a cost that a busy neighbour does not distort).

Prints one JSON line ``{"bench": "faults", "figures", "ratios", "goals", "setup"}`` and writes
``bench/results/faults.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._report import add_output_args, finish
from bench._serving import cpu_seconds, free_port, start, wait_ready

PROMPT = "the quick brown fox jumps over the lazy dog"
MAX_TOKENS = 4
# healthy_control is a second, identical healthy pair: how far two healthy runs differ on this machine (the noise
# floor a faulted ratio must be read against).
CONDITIONS = ("healthy", "otlp_down", "webhook_500", "healthy_control", "alertmanager_down")
FAULTED = ("otlp_down", "webhook_500", "alertmanager_down")
CONTROL = "healthy_control"
SINKS = ("webhook", "alertmanager")




def _receiver_main(port: int) -> None:
    """The webhook subscriber (run as its own process): ``/ok`` answers 200, ``/fail`` 500; ``/count`` tells both."""
    from aiohttp import web

    counts = {"ok": 0, "fail": 0}

    async def ok(request: web.Request) -> web.Response:
        await request.read()
        counts["ok"] += 1
        return web.json_response({"status": "ok"})

    async def fail(request: web.Request) -> web.Response:
        await request.read()
        counts["fail"] += 1
        return web.json_response({"error": "failing on purpose"}, status=500)

    async def count(request: web.Request) -> web.Response:
        return web.json_response(counts)

    app = web.Application()
    app.router.add_post("/ok", ok)
    app.router.add_post("/fail", fail)
    app.router.add_get("/count", count)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)




def _alertmanager(work: Path, port: int) -> list[str] | None:
    """The command of a real Alertmanager on 127.0.0.1:``port`` routing everything to a receiver with no target,
    or None when none is installed (then the healthy condition has no Alertmanager sink)."""
    binary = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
    if binary is None:
        return None
    config = work / "alertmanager.yml"
    config.write_text(json.dumps({"route": {"receiver": "none"}, "receivers": [{"name": "none"}]}))
    return [binary, f"--config.file={config}", f"--storage.path={work / 'alertmanager-data'}",
            f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address=", "--log.level=warn"]


def _sidecar_config(port: int, *, webhook: str, alertmanager: str | None) -> dict[str, Any]:
    sinks: dict[str, Any] = {"log": {"enabled": False},
                             "webhook": {"url": webhook, "retries": 3, "timeout_s": 2.0}}
    if alertmanager is not None:
        sinks["alertmanager"] = {"url": alertmanager, "retries": 3, "timeout_s": 2.0, "resend_interval_s": 1.0}
    return {
        "port": port,
        "otlp_grpc_port": None,
        "collectors": {"gpu": {"enabled": False}, "interval_s": 1.0},
        # Every request breaches a 1 µs p95 at once: alerts fire as soon as spans arrive.
        "detectors": {"interval_s": 0.25, "latency": {"threshold_s": 1e-6, "for_s": 0.0, "min_count": 1}},
        "alerting": {"sinks": sinks,
                     "rate_limit": {"group_by": ["alertname", "model", "operation"], "group_wait_s": 0.1,
                                    "group_interval_s": 1.0, "repeat_interval_s": 1.0, "rate_per_s": 10.0, "burst": 10}},
        "tuner": {"enabled": False},
    }


def _server_config(port: int, *, endpoint: str, model: dict[str, Any]) -> dict[str, Any]:
    return {
        "models": [model],
        "server": {"port": port, "queue_capacity": 1024, "drain_timeout_s": 5},
        "telemetry": {"tracing": {"endpoint": endpoint, "export_timeout_s": 2.0}},
    }




async def _load(base: str, model: str, connections: int, duration: float) -> dict[str, Any]:
    """``connections`` clients in a closed loop for ``duration`` seconds: completed req/s and each request's latency."""
    import aiohttp

    url = f"{base}/v1/completions"
    payload = json.dumps({"model": model, "prompt": PROMPT, "max_tokens": MAX_TOKENS}).encode()
    headers = {"Content-Type": "application/json"}
    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:
        stop_at = time.monotonic() + duration

        async def client() -> None:
            nonlocal errors
            while time.monotonic() < stop_at:
                sent = time.monotonic()
                async with session.post(url, data=payload, headers=headers) as resp:
                    await resp.read()
                    if resp.status == 200:
                        latencies.append(time.monotonic() - sent)
                    else:
                        errors += 1

        started = time.monotonic()
        await asyncio.gather(*(client() for _ in range(connections)))
        elapsed = time.monotonic() - started
    return {"rps": len(latencies) / elapsed, "latencies": latencies, "errors": errors}




def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def _counters(session: Any, url: str, names: set[str]) -> dict[str, dict[str, float]]:
    """``name -> {label value or "": value}`` of the named counters in an exposition (first label only)."""
    from prometheus_client.parser import text_string_to_metric_families

    async with session.get(url) as resp:
        text = await resp.text()
    out: dict[str, dict[str, float]] = {name: {} for name in names}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in names:
                label = next(iter(sample.labels.values()), "")
                out[sample.name][label] = out[sample.name].get(label, 0.0) + sample.value
    return out


SIDECAR_COUNTERS = {
    "sent": "muai_sidecar_notifications_sent_total",
    "failed": "muai_sidecar_notifications_failed_total",
    "retried": "muai_sidecar_notification_retries_total",
    "dropped": "muai_sidecar_notifications_dropped_total",
}
SERVER_COUNTERS = {
    "spans_dropped": "muai_telemetry_spans_dropped_total",
    "export_failures": "muai_telemetry_export_failures_total",
}


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    import aiohttp
    import psutil

    work = Path(tempfile.mkdtemp(prefix="muai-bench-faults-"))
    model_dir = work / "echo-model"
    model_dir.mkdir()
    model = {"name": "echo", "path": str(model_dir), "engine": "echo"}
    receiver_port, am_port = free_port(), free_port()
    # Closed ports: bound once to learn a free number, then left unbound, so every connection is refused.
    closed_otlp, closed_am = free_port(), free_port()
    am_cmd = _alertmanager(work, am_port)
    am_url = f"http://127.0.0.1:{am_port}" if am_cmd else None
    webhook_ok, webhook_fail = (f"http://127.0.0.1:{receiver_port}/{path}" for path in ("ok", "fail"))
    procs: list[subprocess.Popen] = []
    handles: dict[tuple[str, str], Any] = {}
    servers: dict[str, str] = {}
    sidecars: dict[str, str] = {}
    try:
        procs.append(start([sys.executable, "-c", f"from bench.faults import _receiver_main; _receiver_main({receiver_port})"],
                            work / "receiver.log"))
        if am_cmd:
            procs.append(start(am_cmd, work / "alertmanager.log"))
        for condition in CONDITIONS:
            side_port, server_port = free_port(), free_port()
            side = _sidecar_config(
                side_port,
                webhook=webhook_fail if condition == "webhook_500" else webhook_ok,
                alertmanager=f"http://127.0.0.1:{closed_am}" if condition == "alertmanager_down" else am_url,
            )
            endpoint = (f"http://127.0.0.1:{closed_otlp}/v1/traces" if condition == "otlp_down"
                        else f"http://127.0.0.1:{side_port}/v1/traces")
            config = {**_server_config(server_port, endpoint=endpoint, model=model), "sidecar": side}
            path = work / f"{condition}.json"
            path.write_text(json.dumps(config))
            for command in ("sidecar", "serve"):
                procs.append(start([sys.executable, "-m", "muai", "--log-level", "warning", command, "--config", str(path)],
                                    work / f"{condition}-{command}.log"))
                handles[(condition, command)] = psutil.Process(procs[-1].pid)
            servers[condition] = f"http://127.0.0.1:{server_port}"
            sidecars[condition] = f"http://127.0.0.1:{side_port}"
        async with aiohttp.ClientSession() as session:
            for condition in CONDITIONS:
                await wait_ready(session, f"{sidecars[condition]}/health", procs)
                await wait_ready(session, f"{servers[condition]}/health/ready", procs)
            await wait_ready(session, f"http://127.0.0.1:{receiver_port}/count", procs)
            if am_url:
                await wait_ready(session, f"{am_url}/-/ready", procs)
        for condition in CONDITIONS:
            await _load(servers[condition], model["name"], args.connections, args.warmup)
        # Alerts must be firing (and so notifying) wherever spans arrive before anything is measured.
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + 30
            for condition in CONDITIONS:
                if condition == "otlp_down":
                    continue
                while True:
                    firing = await _counters(session, f"{sidecars[condition]}/metrics", {"muai_sidecar_alerts_firing"})
                    if sum(firing["muai_sidecar_alerts_firing"].values()) > 0:
                        break
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"no alert fired in the {condition} sidecar")
                    await _load(servers[condition], model["name"], args.connections, 0.5)
        rounds: dict[str, list[dict[str, Any]]] = {c: [] for c in CONDITIONS}
        # CPU seconds each process spends while its own condition is loaded, and while the others are (background).
        cpu: dict[tuple[str, str], dict[str, float]] = {key: {"own": 0.0, "others": 0.0} for key in handles}
        for i in range(args.rounds):
            # Rotated every round, so each condition runs in each position (first, after a given one, last) as often.
            shift = i % len(CONDITIONS)
            for condition in CONDITIONS[shift:] + CONDITIONS[:shift]:
                before = {key: cpu_seconds(h) for key, h in handles.items()}
                rounds[condition].append(await _load(servers[condition], model["name"], args.connections, args.duration))
                for key, h in handles.items():
                    cpu[key]["own" if key[0] == condition else "others"] += cpu_seconds(h) - before[key]
        async with aiohttp.ClientSession() as session:
            # An export to the closed port fails only after its retries run out (telemetry.tracing.export_timeout_s):
            # wait for the orchestrator to have counted one, so a short run reports it too.
            deadline = time.monotonic() + 30
            failures = SERVER_COUNTERS["export_failures"]
            while "otlp_down" in servers and time.monotonic() < deadline:
                seen = await _counters(session, f"{servers['otlp_down']}/metrics", {failures})
                if sum(seen[failures].values()) > 0:
                    break
                await asyncio.sleep(0.2)
            sinks = {c: await _counters(session, f"{sidecars[c]}/metrics", set(SIDECAR_COUNTERS.values()))
                     for c in CONDITIONS}
            server_counters = {c: await _counters(session, f"{servers[c]}/metrics", set(SERVER_COUNTERS.values()))
                               for c in CONDITIONS}
            async with session.get(f"http://127.0.0.1:{receiver_port}/count") as resp:
                webhook_received = await resp.json()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()

    # Paired: each faulted round against the healthy round of the same cycle, then the median over cycles. The load
    # of a shared machine drifts by a third between cycles; within one cycle the four conditions see much the same.
    rps = {c: statistics.median(r["rps"] for r in runs) for c, runs in rounds.items()}
    latencies = {c: [x for r in runs for x in r["latencies"]] for c, runs in rounds.items()}
    paired = {c: statistics.median(f["rps"] / h["rps"] for f, h in zip(rounds[c], rounds["healthy"])) for c in FAULTED}
    ratios = {f"{c}_vs_healthy": round(paired[c], 3) for c in FAULTED}
    control = statistics.median(f["rps"] / h["rps"] for f, h in zip(rounds[CONTROL], rounds["healthy"]))
    worst = min(FAULTED, key=lambda c: paired[c])
    ratios = {"serving_under_telemetry_faults_vs_healthy": round(paired[worst], 3), **ratios}
    goal = ratios["serving_under_telemetry_faults_vs_healthy"]
    figures: dict[str, Any] = {
        "rps": {c: round(v, 1) for c, v in rps.items()},
        "best_round_rps": {c: round(max(r["rps"] for r in runs), 1) for c, runs in rounds.items()},
        "p50_ms": {c: round(statistics.median(v) * 1e3, 2) for c, v in latencies.items()},
        "p99_ms": {c: round(_quantile(v, 0.99) * 1e3, 2) for c, v in latencies.items()},
        "p99_vs_healthy": {c: round(_quantile(latencies[c], 0.99) / _quantile(latencies["healthy"], 0.99), 3)
                           for c in FAULTED},
        "worst_condition": worst,
        "noise_floor_control_vs_healthy": round(control, 3),
        "rounds_rps": {c: [round(r["rps"], 1) for r in runs] for c, runs in rounds.items()},
        "errors": {c: sum(r["errors"] for r in runs) for c, runs in rounds.items()},
        "notifications": {
            c: {sink: {key: sinks[c][name].get(sink, 0.0) for key, name in SIDECAR_COUNTERS.items()} for sink in SINKS}
            for c in CONDITIONS
        },
        "orchestrator_telemetry": {
            c: {key: sum(server_counters[c][name].values()) for key, name in SERVER_COUNTERS.items()} for c in CONDITIONS
        },
        "webhook_received": webhook_received,
        # The orchestrator's own CPU per request does not move with a neighbour's load the way req/s does: a fault
        # that made serving work harder would show here.
        "serve_cpu_us_per_request": {c: round(cpu[(c, "serve")]["own"] / len(latencies[c]) * 1e6, 1)
                                     for c in CONDITIONS if latencies[c]},
        "cpu_s_while_loaded": {f"{c}_{cmd}": round(v["own"], 2) for (c, cmd), v in cpu.items()},
        "cpu_s_while_idle": {f"{c}_{cmd}": round(v["others"], 2) for (c, cmd), v in cpu.items()},
    }
    return {
        "bench": "faults",
        "figures": figures,
        "ratios": ratios,
        "goals": {"serving_under_telemetry_faults_vs_healthy": {"goal": ">= 0.9", "met": goal >= 0.9}},
        "setup": {
            "engine": "echo engine",
            "connections": args.connections,
            "duration_s": args.duration,
            "rounds": args.rounds,
            "conditions": {
                "healthy": "spans to the sidecar; webhook answers 200; "
                           + ("a real Alertmanager" if am_url else "no Alertmanager installed: that sink off"),
                CONTROL: "the same as healthy, a second pair of processes (the noise floor)",
                "otlp_down": "telemetry.tracing.endpoint on a closed 127.0.0.1 port (export_timeout_s 2 everywhere)",
                "webhook_500": "the webhook receiver answers 500 to every notification (3 retries each)",
                "alertmanager_down": "sidecar.alerting.sinks.alertmanager.url on a closed 127.0.0.1 port (3 retries)",
            },
            "alerts": "latency rule at 1 us, for 0 s, min_count 1; rate limit: group per series, 1 s intervals",
            "request": {"prompt": PROMPT, "max_tokens": MAX_TOKENS},
            "cpus": os.cpu_count(),
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="muai bench faults", description=__doc__.splitlines()[0])
    p.add_argument("--connections", type=int, default=32, help="concurrent client connections (default 32)")
    p.add_argument("--duration", type=float, default=1.5, help="seconds per measured round (default 1.5)")
    p.add_argument("--rounds", type=int, default=10, help="measured rounds per condition, interleaved (default 10)")
    p.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per condition (default 1)")
    add_output_args(p)
    args = p.parse_args(argv)
    report = asyncio.run(_run(args))
    return finish(report, args)


if __name__ == "__main__":
    sys.exit(main())
