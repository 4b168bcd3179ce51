"""The sidecar's costs, measured in one run (issue 6).

- ``spans_per_s``: OTLP/HTTP ingestion capacity of one core. The sidecar runs as its own process
  (``python -m sidecar``) pinned to one CPU; the bench posts pre-encoded protobuf batches of ``--batch`` spans
  (each request a SERVER root span plus a CLIENT inference span, GenAI attributes, as the orchestrator emits them)
  from several connections on the other CPU(s). Figure: spans accepted per second of the sidecar's own CPU time
  (what one fully busy core ingests); ``spans_per_s_wall`` is the same count per wall second. Goal >= 20,000.
- ``query_us``: p50/p95/p99 of one ``/api/v1/stats`` query's work (``PerformanceMonitor.stats`` for one series and
  one window) over a window holding 10,000 samples, queried repeatedly as dashboards do (statistics are cached
  until the window changes). ``query_fresh_us``: the same when a new sample arrived since the previous query
  (the percentiles are recomputed). ``http_query_ms``: the whole HTTP round trip against the running sidecar, for
  reference. Goal (query_us) <= 100.
- ``cpu_at_1k_spans``: the sidecar process's CPU, as a fraction of one core, while it receives 1,000 spans/s
  (batches of 200, five a second, like an SDK exporter's batch processor). Goal <= 0.05.
- ``rss_mb``: the sidecar's largest resident memory over the run. Goal <= 150.
- ``grpc``: the ingestion and the steady load again over OTLP/gRPC (the sidecar's receiver on
  ``sidecar.otlp_grpc_port``; the same protobuf bodies as unary ``TraceService/Export`` calls), with the same goals
  (``--no-grpc`` skips it).

Prints one JSON line ``{"bench": "sidecar", "figures", "ratios", "goals"}`` and writes ``bench/results/sidecar.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench._report import add_output_args, finish

ROOT = Path(__file__).resolve().parents[1]


# -- payloads --------------------------------------------------------------------------------------------------


def _payloads(n_batches: int, batch: int, seed: int = 1) -> list[bytes]:
    """ExportTraceServiceRequest bodies built by the real SDK encoder: ``batch`` spans each (half requests)."""
    import random

    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind

    rng = random.Random(seed)
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "muai-orchestrator"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("bench.sidecar")
    models = ["llama-8b", "minilm", "qwen-0.5b"]
    ops = {"llama-8b": "chat", "minilm": "embeddings", "qwen-0.5b": "text_completion"}
    bodies = []
    t0 = time.time_ns()
    for _ in range(n_batches):
        for _ in range(batch // 2):
            model = rng.choice(models)
            op = ops[model]
            dur = int(rng.lognormvariate(-2.0, 0.6) * 1e9)
            attrs = {"gen_ai.operation.name": op, "gen_ai.request.model": model}
            root = tracer.start_span(f"POST /v1/{op}", kind=SpanKind.SERVER, start_time=t0, attributes={**attrs, "muai.request": True})
            inner = tracer.start_span(
                f"{op} {model}", kind=SpanKind.CLIENT, start_time=t0, context=trace.set_span_in_context(root),
                attributes={**attrs, "muai.engine": "torch", "gen_ai.usage.input_tokens": rng.randint(5, 500),
                            "gen_ai.usage.output_tokens": rng.randint(1, 200), "muai.batch_size": rng.randint(1, 16)},
            )
            inner.end(end_time=t0 + int(dur * 0.9))
            root.end(end_time=t0 + dur)
        bodies.append(encode_spans(exporter.get_finished_spans()).SerializeToString())
        exporter.clear()
    provider.shutdown()
    return bodies


# -- the sidecar process ---------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Sidecar:
    """``python -m sidecar`` on a free port, optionally pinned to one CPU; stopped by PID."""

    def __init__(self, cpu: int | None) -> None:
        import psutil

        self.port = _free_port()
        self.grpc_port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "--port", str(self.port), "--otlp-grpc-port", str(self.grpc_port)],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        if cpu is not None and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(self.proc.pid, {cpu})
        self.ps = psutil.Process(self.proc.pid)
        self.max_rss = 0

    async def wait_ready(self, session, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                async with session.get(self.url + "/health") as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"sidecar exited with {self.proc.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError("sidecar did not become ready")
            await asyncio.sleep(0.1)

    def cpu_s(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system

    def rss_mb(self) -> float:
        rss = self.ps.memory_info().rss / 2**20
        self.max_rss = max(self.max_rss, rss)
        return rss

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


GRPC_EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


class _Sender:
    """Posts pre-encoded ExportTraceServiceRequest bodies over OTLP/HTTP or OTLP/gRPC (the bytes as they are: both
    transports carry the same protobuf message)."""

    def __init__(self, session, sidecar: _Sidecar, transport: str) -> None:
        self.transport = transport
        self._session = session
        self._url = sidecar.url + "/v1/traces"
        self._channel = self._export = None
        if transport == "grpc":
            import grpc

            self._channel = grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.grpc_port}")
            # No serializers: the request is already protobuf bytes, and the answer is not needed.
            self._export = self._channel.unary_unary(GRPC_EXPORT)

    async def send(self, body: bytes) -> None:
        if self._export is not None:
            await self._export(body, timeout=30)
            return
        async with self._session.post(self._url, data=body, headers={"Content-Type": "application/x-protobuf"}) as resp:
            await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"sidecar answered {resp.status}")

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()


async def _ingestion(bodies: list[bytes], batch: int, duration_s: float, connections: int, sidecar_cpu: int | None,
                     transport: str = "http") -> dict[str, float]:
    import aiohttp

    sidecar = _Sidecar(sidecar_cpu)
    try:
        conn = aiohttp.TCPConnector(limit=connections)
        async with aiohttp.ClientSession(connector=conn) as session:
            await sidecar.wait_ready(session)
            sender = _Sender(session, sidecar, transport)
            for body in bodies[:4]:  # warm-up: imports, first series, caches
                await sender.send(body)
            sent = 0
            cpu0, wall0 = sidecar.cpu_s(), time.perf_counter()
            stop_at = wall0 + duration_s

            async def worker(offset: int) -> None:
                nonlocal sent
                i = offset
                while time.perf_counter() < stop_at:
                    await sender.send(bodies[i % len(bodies)])
                    sent += batch
                    i += connections

            await asyncio.gather(*(worker(k) for k in range(connections)))
            wall = time.perf_counter() - wall0
            cpu = sidecar.cpu_s() - cpu0
            sidecar.rss_mb()
            await sender.close()
            # HTTP round trip of a stats query, for reference (client + server + JSON).
            lat = []
            for _ in range(200):
                t = time.perf_counter()
                async with session.get(sidecar.url + "/api/v1/stats", params={"model": "llama-8b", "window": "1m"}) as resp:
                    await resp.read()
                lat.append((time.perf_counter() - t) * 1e3)
        return {
            "spans": sent,
            "spans_per_s": sent / cpu if cpu > 0 else float("nan"),
            "spans_per_s_wall": sent / wall,
            "sidecar_cpu_fraction_during_ingest": cpu / wall,
            "http_query_ms_p50": statistics.median(lat),
            "rss_mb_after_ingest": sidecar.max_rss,
        }
    finally:
        sidecar.stop()


async def _steady(bodies: list[bytes], per_s: int, batch: int, duration_s: float,
                  transport: str = "http") -> dict[str, float]:
    import aiohttp

    sidecar = _Sidecar(None)
    try:
        async with aiohttp.ClientSession() as session:
            await sidecar.wait_ready(session)
            sender = _Sender(session, sidecar, transport)
            await sender.send(bodies[0])
            interval = batch / per_s
            cpu0, t0 = sidecar.cpu_s(), time.perf_counter()
            n = 0
            while True:
                due = t0 + n * interval
                now = time.perf_counter()
                if now - t0 >= duration_s:
                    break
                if due > now:
                    await asyncio.sleep(due - now)
                await sender.send(bodies[n % len(bodies)])
                n += 1
                if n % 20 == 0:
                    sidecar.rss_mb()
            wall = time.perf_counter() - t0
            cpu = sidecar.cpu_s() - cpu0
            sidecar.rss_mb()
            await sender.close()
        return {"spans_per_s_offered": n * batch / wall, "cpu_at_1k_spans": cpu / wall, "rss_mb_steady": sidecar.max_rss}
    finally:
        sidecar.stop()


def _query(samples: int = 10_000, queries: int = 5_000) -> dict[str, float]:
    from sidecar.monitor import PerformanceMonitor
    from sidecar.otlp import REQUEST, SpanSample
    import random

    rng = random.Random(3)
    mon = PerformanceMonitor(windows={"10s": 10.0, "1m": 60.0, "5m": 300.0})
    now = 1000.0
    for i in range(samples):
        mon.record(SpanSample(REQUEST, "llama-8b", "chat", rng.lognormvariate(-2, 0.6), i % 50 == 0), now + i * 0.004)
    now += samples * 0.004  # 40 s of traffic: every sample is inside the 1 m window
    for _ in range(50):
        mon.stats(now, model="llama-8b", window="1m")
    cached, fresh = [], []
    for i in range(queries):
        t = time.perf_counter_ns()
        (s,) = mon.stats(now + i * 1e-6, model="llama-8b", window="1m")
        cached.append((time.perf_counter_ns() - t) / 1e3)
    assert s.requests == samples
    for i in range(min(queries, 2_000)):
        mon.record(SpanSample(REQUEST, "llama-8b", "chat", 0.1, False), now + 0.01 + i * 1e-6)
        t = time.perf_counter_ns()
        mon.stats(now + 0.01 + i * 1e-6, model="llama-8b", window="1m")
        fresh.append((time.perf_counter_ns() - t) / 1e3)

    def pct(xs: list[float], q: float) -> float:
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(q * len(xs)))]

    return {
        "query_us": {"p50": pct(cached, 0.5), "p95": pct(cached, 0.95), "p99": pct(cached, 0.99)},
        "query_fresh_us": {"p50": pct(fresh, 0.5), "p95": pct(fresh, 0.95), "p99": pct(fresh, 0.99)},
    }


def _round(obj: Any) -> Any:
    if isinstance(obj, float):
        return round(obj, 4)
    if isinstance(obj, dict):
        return {k: _round(v) for k, v in obj.items()}
    return obj


def run(args: argparse.Namespace) -> dict[str, Any]:
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    sidecar_cpu = cpus[0] if len(cpus) >= 2 else None
    if sidecar_cpu is not None:
        # The load generator keeps off the sidecar's core.
        os.sched_setaffinity(0, set(cpus[1:]))
    bodies = _payloads(args.batches, args.batch)
    small = _payloads(10, 200, seed=2)
    query = _query()
    ingest = asyncio.run(_ingestion(bodies, args.batch, args.duration, args.connections, sidecar_cpu))
    steady = asyncio.run(_steady(small, 1000, 200, args.steady_duration))
    grpc_ingest = grpc_steady = None
    if args.grpc:
        grpc_ingest = asyncio.run(_ingestion(bodies, args.batch, args.duration, args.connections, sidecar_cpu, "grpc"))
        grpc_steady = asyncio.run(_steady(small, 1000, 200, args.steady_duration, "grpc"))
    if sidecar_cpu is not None:
        os.sched_setaffinity(0, set(cpus))
    figures = {
        "spans_per_s": ingest["spans_per_s"],
        "spans_per_s_wall": ingest["spans_per_s_wall"],
        "sidecar_cpu_fraction_during_ingest": ingest["sidecar_cpu_fraction_during_ingest"],
        "spans_ingested": ingest["spans"],
        "batch_spans": args.batch,
        "query_us": query["query_us"],
        "query_fresh_us": query["query_fresh_us"],
        "http_query_ms_p50": ingest["http_query_ms_p50"],
        "cpu_at_1k_spans": steady["cpu_at_1k_spans"],
        "spans_per_s_offered_steady": steady["spans_per_s_offered"],
        "rss_mb": max(ingest["rss_mb_after_ingest"], steady["rss_mb_steady"]),
        "cpus": len(cpus) or os.cpu_count(),
        "sidecar_pinned": sidecar_cpu is not None,
    }
    ratios = {
        "spans_per_s_vs_goal": figures["spans_per_s"] / 20_000,
        "query_p99_us_vs_goal": figures["query_us"]["p99"] / 100,
        "cpu_at_1k_spans_vs_goal": figures["cpu_at_1k_spans"] / 0.05,
        "rss_mb_vs_goal": figures["rss_mb"] / 150,
    }
    goals = {
        "spans_per_s": {"goal": ">= 20000", "met": figures["spans_per_s"] >= 20_000},
        "query_us": {"goal": "p50/p95/p99 <= 100", "met": all(v <= 100 for v in figures["query_us"].values())},
        "cpu_at_1k_spans": {"goal": "<= 0.05", "met": figures["cpu_at_1k_spans"] <= 0.05},
        "rss_mb": {"goal": "<= 150", "met": figures["rss_mb"] <= 150},
    }
    if grpc_ingest is not None and grpc_steady is not None:
        grpc_figures = {
            "spans_per_s": grpc_ingest["spans_per_s"],
            "spans_per_s_wall": grpc_ingest["spans_per_s_wall"],
            "cpu_at_1k_spans": grpc_steady["cpu_at_1k_spans"],
            "rss_mb": max(grpc_ingest["rss_mb_after_ingest"], grpc_steady["rss_mb_steady"]),
        }
        figures["grpc"] = grpc_figures
        ratios["grpc_spans_per_s_vs_http"] = grpc_figures["spans_per_s"] / figures["spans_per_s"]
        goals["grpc_spans_per_s"] = {"goal": ">= 20000", "met": grpc_figures["spans_per_s"] >= 20_000}
        goals["grpc_cpu_at_1k_spans"] = {"goal": "<= 0.05", "met": grpc_figures["cpu_at_1k_spans"] <= 0.05}
        goals["grpc_rss_mb"] = {"goal": "<= 150", "met": grpc_figures["rss_mb"] <= 150}
    return {"bench": "sidecar", "figures": _round(figures), "ratios": _round(ratios), "goals": goals}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sidecar", description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=8.0, help="seconds of saturated ingestion")
    p.add_argument("--steady-duration", type=float, default=10.0, help="seconds at 1k spans/s")
    p.add_argument("--batch", type=int, default=512, help="spans per OTLP request (the SDK's default max batch)")
    p.add_argument("--batches", type=int, default=40, help="distinct pre-encoded bodies")
    p.add_argument("--connections", type=int, default=4)
    p.add_argument("--no-grpc", dest="grpc", action="store_false",
                   help="skip the same ingestion and steady load over OTLP/gRPC (default: both transports)")
    add_output_args(p)
    args = p.parse_args(argv)
    report = run(args)
    return finish(report, args)


if __name__ == "__main__":
    sys.exit(main())
