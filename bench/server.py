"""The server's cost of telemetry, measured side by side in one run (issues 4 and 16; requirements 4, 5, 13.5).

Real servers (`python -m muai serve`, each its own process) serve the same request, with telemetry off and on:

- **bare**: metrics and tracing off;
- **instrumented**: the defaults: Prometheus metrics on, tracing on with consistent probability sampling (every new
  trace while traffic is under ``telemetry.tracing.sampling_budget_per_s``, about that many per second above it),
  exporting over OTLP/HTTP to a **local OTLP receiver** (a third process that decodes every batch with
  opentelemetry-proto), so span encoding and export are part of the cost.

Two engines: the echo engine (a real engine implementation that returns its input, so the figures are the server's
and not a model's) and the torch engine on ``builtin:tiny-llama`` (4 greedy tokens: what a small model costs).
An aiohttp client keeps ``--connections`` connections busy in a closed loop (`POST /v1/completions`) against one
server at a time; the servers alternate over ``--rounds`` rounds of ``--duration`` seconds (order swapped every round)
after a warm-up. Each throughput is the best round (on a shared machine other processes only ever slow a run down).

- ``instrumented_vs_bare`` (echo) = instrumented req/s / bare req/s, goal >= 0.9;
  ``torch_instrumented_vs_bare`` the same on the torch engine, goal >= 0.97.
- ``telemetry_us_per_request`` (echo): the server process's CPU time per request (user + system, all its threads,
  read from the OS over each round; median over rounds), instrumented minus bare, goal <= 10. CPU time rather than
  1/throughput, so that a machine shared with other work does not count as telemetry. ``cpu_us_per_request_by_thread``
  splits it: ``serving`` (the event loop) and ``other`` (the span exporter's worker, which encodes and posts spans,
  and the engine's and the samplers' threads).
- A breakdown (metrics only, tracing only, and everything on with a 0.1 sampling ratio and no budget) says where
  the cost is; ``--no-breakdown`` skips it.

Prints one JSON line ``{"bench": "server", "figures", "ratios", "goals", "setup"}`` and writes
``bench/results/server.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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




def _receiver_main(port: int) -> None:
    """A local OTLP/HTTP receiver: decodes each export request and counts spans (run as its own process)."""
    from aiohttp import web
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
        ExportTraceServiceResponse,
    )

    spans = 0
    ok = ExportTraceServiceResponse().SerializeToString()

    async def traces(request: web.Request) -> web.Response:
        nonlocal spans
        message = ExportTraceServiceRequest()
        message.ParseFromString(await request.read())
        spans += sum(len(ss.spans) for rs in message.resource_spans for ss in rs.scope_spans)
        return web.Response(body=ok, content_type="application/x-protobuf")

    async def count(request: web.Request) -> web.Response:
        return web.json_response({"spans": spans})

    app = web.Application(client_max_size=256 * 1024**2)
    app.router.add_post("/v1/traces", traces)
    app.router.add_get("/count", count)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)




VARIANTS: dict[str, tuple[bool, bool, float | None]] = {  # name -> (metrics, tracing, sampling ratio; None: default)
    "bare": (False, False, None),
    "instrumented": (True, True, None),
    "metrics_only": (True, False, None),
    "tracing_only": (False, True, None),
    "instrumented_sampling_0_1": (True, True, 0.1),
}
BREAKDOWN = ("metrics_only", "tracing_only", "instrumented_sampling_0_1")
TORCH_PREFIX = "torch_"


def _server_config(port: int, *, metrics: bool, tracing: bool, sampling: float | None, endpoint: str,
                   model: dict[str, Any]) -> dict[str, Any]:
    tracing_cfg: dict[str, Any] = {"enabled": tracing, "endpoint": endpoint}
    if sampling is not None:
        # A fixed ratio, not the budget: what sampling alone buys back.
        tracing_cfg.update(sampling_ratio=sampling, sampling_budget_per_s=None)
    return {
        "models": [model],
        "server": {"port": port, "queue_capacity": 1024, "drain_timeout_s": 5},
        "telemetry": {"metrics": {"enabled": metrics}, "tracing": tracing_cfg},
    }






async def _load(base: str, model: str, connections: int, duration: float, server: Any = None) -> dict[str, float]:
    """``connections`` clients in a closed loop for ``duration`` seconds; completed requests per second, and the
    server process's CPU microseconds per request when ``server`` (a ``psutil.Process``) is given."""
    import aiohttp

    url = f"{base}/v1/completions"
    payload = json.dumps({"model": model, "prompt": PROMPT, "max_tokens": MAX_TOKENS}).encode()
    headers = {"Content-Type": "application/json"}
    done = errors = 0
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:
        stop_at = time.monotonic() + duration

        async def client() -> None:
            nonlocal done, errors
            while time.monotonic() < stop_at:
                async with session.post(url, data=payload, headers=headers) as resp:
                    await resp.read()
                    if resp.status == 200:
                        done += 1
                    else:
                        errors += 1

        cpu_before = cpu_seconds(server) if server is not None else 0.0
        threads_before = _thread_cpu(server) if server is not None else {}
        started = time.monotonic()
        await asyncio.gather(*(client() for _ in range(connections)))
        elapsed = time.monotonic() - started
        cpu = cpu_seconds(server) - cpu_before if server is not None else 0.0
        threads_after = _thread_cpu(server) if server is not None else {}
    by_thread: dict[str, float] = {}
    for tid, (role, seconds) in threads_after.items():
        spent = seconds - threads_before.get(tid, (role, 0.0))[1]
        by_thread[role] = by_thread.get(role, 0.0) + (spent / done * 1e6 if done else 0.0)
    return {"rps": done / elapsed, "requests": done, "errors": errors, "seconds": elapsed,
            "cpu_us_per_request": cpu / done * 1e6 if done and server is not None else 0.0,
            "cpu_us_by_thread": by_thread}


def _thread_cpu(proc: Any) -> dict[int, tuple[str, float]]:
    """Each thread's role and CPU seconds: ``serving`` (the event loop, the process's main thread) or ``other``
    (the span exporter's worker, engine workers, torch's pool, samplers: Python 3.11 names none of them to the OS)."""
    return {t.id: ("serving" if t.id == proc.pid else "other", t.user_time + t.system_time) for t in proc.threads()}


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    import aiohttp
    import psutil

    work = Path(tempfile.mkdtemp(prefix="muai-bench-server-"))
    model_dir = work / "echo-model"
    model_dir.mkdir()
    recv_port = free_port()
    endpoint = f"http://127.0.0.1:{recv_port}/v1/traces"
    echo_model = {"name": "echo", "path": str(model_dir), "engine": "echo"}
    torch_model = {"name": "tiny-llama", "path": "builtin:tiny-llama", "engine": "torch"}
    # name -> (variant, model); the torch pair answers "what does telemetry cost next to a (small) model".
    servers: dict[str, tuple[str, dict[str, Any]]] = {
        name: (name, echo_model) for name in ("bare", "instrumented", *(BREAKDOWN if args.breakdown else ()))}
    if "torch" in args.engines:
        servers.update({f"{TORCH_PREFIX}{v}": (v, torch_model) for v in ("bare", "instrumented")})
    if "echo" not in args.engines:
        servers = {k: v for k, v in servers.items() if k.startswith(TORCH_PREFIX)}
    procs: list[subprocess.Popen] = []
    bases: dict[str, str] = {}
    handles: dict[str, Any] = {}
    try:
        procs.append(start([sys.executable, "-c", f"from bench.server import _receiver_main; _receiver_main({recv_port})"],
                            work / "receiver.log"))
        for name, (variant, model) in servers.items():
            port = free_port()
            metrics, tracing, sampling = VARIANTS[variant]
            path = work / f"{name}.json"
            path.write_text(json.dumps(_server_config(port, metrics=metrics, tracing=tracing, sampling=sampling,
                                                      endpoint=endpoint, model=model)))
            proc = start([sys.executable, "-m", "muai", "--log-level", "warning", "serve", "--config", str(path)],
                          work / f"{name}.log")
            procs.append(proc)
            handles[name] = psutil.Process(proc.pid)
            bases[name] = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as session:
            for base in bases.values():
                await wait_ready(session, f"{base}/health/ready", procs)
            await wait_ready(session, f"http://127.0.0.1:{recv_port}/count", procs)
        for name, base in bases.items():
            await _load(base, servers[name][1]["name"], args.connections, args.warmup)
        rounds: dict[str, list[dict[str, float]]] = {name: [] for name in servers}
        for i in range(args.rounds):
            order = list(servers) if i % 2 == 0 else list(reversed(servers))
            for name in order:
                rounds[name].append(await _load(bases[name], servers[name][1]["name"], args.connections,
                                                args.duration, handles[name]))
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{recv_port}/count") as resp:
                spans_received = (await resp.json())["spans"]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    best = {name: max(r["rps"] for r in runs) for name, runs in rounds.items()}
    cpu_us = {name: statistics.median(r["cpu_us_per_request"] for r in runs) for name, runs in rounds.items()}
    by_thread = {name: {role: round(statistics.median(r["cpu_us_by_thread"].get(role, 0.0) for r in runs), 1)
                        for role in ("serving", "other")} for name, runs in rounds.items()}

    def vs_bare(name: str, bare: str) -> float | None:
        return round(best[name] / best[bare], 3) if name in best and best.get(bare) else None

    ratios: dict[str, float] = {}
    goals: dict[str, Any] = {}
    if "bare" in best:
        ratios["instrumented_vs_bare"] = vs_bare("instrumented", "bare")
        for name in BREAKDOWN:
            if name in best:
                ratios[f"{name}_vs_bare"] = vs_bare(name, "bare")
        goals["instrumented_vs_bare"] = {"goal": ">= 0.9", "met": ratios["instrumented_vs_bare"] >= 0.9}
    torch_bare = f"{TORCH_PREFIX}bare"
    if torch_bare in best:
        ratios["torch_instrumented_vs_bare"] = vs_bare(f"{TORCH_PREFIX}instrumented", torch_bare)
        goals["torch_instrumented_vs_bare"] = {"goal": ">= 0.97",
                                               "met": ratios["torch_instrumented_vs_bare"] >= 0.97}
    figures: dict[str, Any] = {
        **{f"{name}_rps": round(value, 1) for name, value in best.items()},
        "cpu_us_per_request": {name: round(v, 1) for name, v in cpu_us.items()},
        "cpu_us_per_request_by_thread": by_thread,
        "rounds": {name: [round(r["rps"], 1) for r in runs] for name, runs in rounds.items()},
        "errors": {name: sum(r["errors"] for r in runs) for name, runs in rounds.items()},
        "spans_received": spans_received,
    }
    if "bare" in cpu_us:
        telemetry_us = cpu_us["instrumented"] - cpu_us["bare"]
        figures["telemetry_us_per_request"] = round(telemetry_us, 1)
        goals["telemetry_us_per_request"] = {"goal": "<= 10", "met": telemetry_us <= 10}
    if torch_bare in cpu_us:
        figures["torch_telemetry_us_per_request"] = round(cpu_us[f"{TORCH_PREFIX}instrumented"] - cpu_us[torch_bare], 1)
    return {
        "bench": "server",
        "figures": figures,
        "ratios": ratios,
        "goals": goals,
        "setup": {
            "engines": {"echo": "echo engine", "torch": "torch engine, builtin:tiny-llama, greedy"},
            "connections": args.connections,
            "duration_s": args.duration,
            "rounds": args.rounds,
            "instrumented": "the defaults: metrics on, tracing on (budgeted consistent sampling, BatchSpanProcessor, "
                            "OTLP/HTTP protobuf)",
            "exporter": "local OTLP/HTTP receiver in its own process (every span decoded)",
            "request": {"prompt": PROMPT, "max_tokens": MAX_TOKENS},
            "cpus": os.cpu_count(),
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="muai bench server", description=__doc__.splitlines()[0])
    p.add_argument("--connections", type=int, default=64, help="concurrent client connections (default 64)")
    p.add_argument("--duration", type=float, default=2.0, help="seconds per measured round (default 2)")
    p.add_argument("--rounds", type=int, default=5, help="measured rounds per server, interleaved (default 5)")
    p.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per server (default 1)")
    p.add_argument("--engines", default="echo,torch", type=lambda v: [e.strip() for e in v.split(",") if e.strip()],
                   help="comma-separated: echo, torch (default both)")
    p.add_argument("--no-breakdown", dest="breakdown", action="store_false",
                   help="skip the metrics-only and tracing-only servers (default: measure them too)")
    add_output_args(p)
    args = p.parse_args(argv)
    report = asyncio.run(_run(args))
    return finish(report, args)


if __name__ == "__main__":
    sys.exit(main())
