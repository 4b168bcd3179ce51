"""The server's cost of telemetry, measured side by side in one run (issue 4; requirements 4, 5, 13.5).

Two real servers (`python -m muai serve`, each its own process) serve the echo engine, a real engine implementation
that returns its input, so the figures are the server's and not a model's:

- **bare**: metrics and tracing off;
- **instrumented**: Prometheus metrics on and tracing on at the default sampling (ratio 1.0, parent based),
  exporting over OTLP/HTTP to a **local OTLP receiver** (a third process that decodes every batch with
  opentelemetry-proto), so span encoding and export are part of the cost.

An aiohttp client keeps 64 connections busy in a closed loop (`POST /v1/completions`, 4 tokens) against one server
at a time; the two alternate over ``--rounds`` rounds of ``--duration`` seconds (order swapped every round) after a
warm-up. Each figure is the best round (on a shared machine other processes only ever slow a run down).
-> ``instrumented_vs_bare`` = instrumented req/s / bare req/s (goal >= 0.9), and the bare server's req/s. A
breakdown (metrics only, tracing only, and everything on with a 0.1 sampling ratio) says where the cost is and
what sampling buys back; ``--no-breakdown`` skips it.

Prints one JSON line ``{"bench": "server", "figures", "ratios", "goals", "setup"}`` and writes
``bench/results/server.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._report import add_output_args, finish

ROOT = Path(__file__).resolve().parents[1]
BODY = {"model": "echo", "prompt": "the quick brown fox jumps over the lazy dog", "max_tokens": 4}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def _start(cmd: list[str], log_path: Path) -> subprocess.Popen:
    log = open(log_path, "wb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MUAI_") or k == "MUAI_CACHE_DIR"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


VARIANTS: dict[str, tuple[bool, bool, float | None]] = {  # name -> (metrics, tracing, sampling ratio; None: default)
    "bare": (False, False, None),
    "instrumented": (True, True, None),
    "metrics_only": (True, False, None),
    "tracing_only": (False, True, None),
    "instrumented_sampling_0_1": (True, True, 0.1),
}


def _server_config(port: int, *, metrics: bool, tracing: bool, sampling: float | None, endpoint: str,
                   model_dir: str) -> dict[str, Any]:
    tracing_cfg: dict[str, Any] = {"enabled": tracing, "endpoint": endpoint}
    if sampling is not None:
        tracing_cfg["sampling_ratio"] = sampling
    return {
        "models": [{"name": "echo", "path": model_dir, "engine": "echo"}],
        "server": {"port": port, "queue_capacity": 1024, "drain_timeout_s": 5},
        "telemetry": {"metrics": {"enabled": metrics}, "tracing": tracing_cfg},
    }


async def _wait_ready(session: Any, url: str, procs: list[subprocess.Popen], timeout: float = 120.0) -> None:
    import aiohttp

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"a benchmark process exited early with {proc.returncode}")
        try:
            async with session.get(url) as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {timeout}s")


async def _load(base: str, connections: int, duration: float) -> dict[str, float]:
    """``connections`` clients in a closed loop for ``duration`` seconds; completed requests per second."""
    import aiohttp

    url = f"{base}/v1/completions"
    payload = json.dumps(BODY).encode()
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

        started = time.monotonic()
        await asyncio.gather(*(client() for _ in range(connections)))
        elapsed = time.monotonic() - started
    return {"rps": done / elapsed, "requests": done, "errors": errors, "seconds": elapsed}


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    import aiohttp

    work = Path(tempfile.mkdtemp(prefix="muai-bench-server-"))
    model_dir = work / "echo-model"
    model_dir.mkdir()
    recv_port = _free_port()
    endpoint = f"http://127.0.0.1:{recv_port}/v1/traces"
    variants = list(VARIANTS) if args.breakdown else ["bare", "instrumented"]
    procs: list[subprocess.Popen] = []
    bases: dict[str, str] = {}
    try:
        procs.append(_start([sys.executable, "-c", f"from bench.server import _receiver_main; _receiver_main({recv_port})"],
                            work / "receiver.log"))
        for name in variants:
            port = _free_port()
            metrics, tracing, sampling = VARIANTS[name]
            path = work / f"{name}.json"
            path.write_text(json.dumps(_server_config(port, metrics=metrics, tracing=tracing, sampling=sampling,
                                                      endpoint=endpoint, model_dir=str(model_dir))))
            procs.append(_start([sys.executable, "-m", "muai", "--log-level", "warning", "serve", "--config", str(path)],
                                work / f"{name}.log"))
            bases[name] = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as session:
            for base in bases.values():
                await _wait_ready(session, f"{base}/health/ready", procs)
            await _wait_ready(session, f"http://127.0.0.1:{recv_port}/count", procs)
        for base in bases.values():
            await _load(base, args.connections, args.warmup)
        rounds: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
        for i in range(args.rounds):
            order = variants if i % 2 == 0 else list(reversed(variants))
            for name in order:
                rounds[name].append(await _load(bases[name], args.connections, args.duration))
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
    ratio = best["instrumented"] / best["bare"] if best["bare"] else 0.0
    ratios = {"instrumented_vs_bare": round(ratio, 3)}
    for name in ("metrics_only", "tracing_only", "instrumented_sampling_0_1"):
        if name in best and best["bare"]:
            ratios[f"{name}_vs_bare"] = round(best[name] / best["bare"], 3)
    figures = {
        **{f"{name}_rps": round(value, 1) for name, value in best.items()},
        "rounds": {name: [round(r["rps"], 1) for r in runs] for name, runs in rounds.items()},
        "errors": {name: sum(r["errors"] for r in runs) for name, runs in rounds.items()},
        "spans_received": spans_received,
    }
    return {
        "bench": "server",
        "figures": figures,
        "ratios": ratios,
        "goals": {"instrumented_vs_bare": {"goal": ">= 0.9", "met": ratio >= 0.9}},
        "setup": {
            "engine": "echo",
            "connections": args.connections,
            "duration_s": args.duration,
            "rounds": args.rounds,
            "instrumented": "metrics on, tracing on (sampling ratio 1.0, BatchSpanProcessor, OTLP/HTTP protobuf)",
            "exporter": "local OTLP/HTTP receiver in its own process (every span decoded)",
            "request": BODY,
            "cpus": os.cpu_count(),
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="muai bench server", description=__doc__.splitlines()[0])
    p.add_argument("--connections", type=int, default=64, help="concurrent client connections (default 64)")
    p.add_argument("--duration", type=float, default=2.0, help="seconds per measured round (default 2)")
    p.add_argument("--rounds", type=int, default=5, help="measured rounds per server, interleaved (default 5)")
    p.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per server (default 1)")
    p.add_argument("--no-breakdown", dest="breakdown", action="store_false",
                   help="skip the metrics-only and tracing-only servers (default: measure them too)")
    add_output_args(p)
    args = p.parse_args(argv)
    report = asyncio.run(_run(args))
    return finish(report, args)


if __name__ == "__main__":
    sys.exit(main())
