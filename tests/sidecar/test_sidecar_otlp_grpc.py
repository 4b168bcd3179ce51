"""The OTLP/gRPC receiver, fed by the OpenTelemetry SDK's real gRPC exporter and by raw (fuzzed) gRPC calls."""

from __future__ import annotations

import asyncio
import random
import socket

import grpc
import pytest
from grpc import aio
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from sidecar.config import SidecarConfig
from sidecar.otlp_grpc import METHOD, SERVICE
from sidecar_helpers import SpanFactory, encode, quiet_config

_PATH = f"/{SERVICE}/{METHOD}"


async def _stats(http, server, **params):
    async with http.get(server.make_url("/api/v1/stats"), params=params) as resp:
        assert resp.status == 200
        return await resp.json()


async def _grpc_sidecar(start_sidecar, **overrides):
    server, state = await start_sidecar(quiet_config(otlp_grpc_port=0, **overrides))
    assert state.otlp_grpc is not None and state.otlp_grpc.port > 0
    return server, state, f"127.0.0.1:{state.otlp_grpc.port}"


async def _raw_export(target: str, body: bytes) -> bytes:
    """One Export call with ``body`` sent as is (no serializer), as a broken or hostile client would."""
    async with aio.insecure_channel(target, options=[("grpc.max_send_message_length", -1)]) as channel:
        return await channel.unary_unary(_PATH)(body, timeout=10)


def test_default_port_is_standard_and_null_turns_it_off():
    assert SidecarConfig().otlp_grpc_port == 4317
    assert SidecarConfig(otlp_grpc_port=None).otlp_grpc_port is None
    with pytest.raises(ValueError, match="same as sidecar.port"):
        SidecarConfig(port=5000, otlp_grpc_port=5000)


@pytest.mark.parametrize("compression", [grpc.Compression.NoCompression, grpc.Compression.Gzip])
async def test_real_grpc_exporter_reaches_the_stats(start_sidecar, http, compression):
    server, state, target = await _grpc_sidecar(start_sidecar)
    f = SpanFactory()
    durations = [0.01 * (i + 1) for i in range(100)]
    for d in durations:
        f.request(d, model="llama", operation="chat")
    f.vllm(0.5)
    spans = f.take()
    exporter = OTLPSpanExporter(endpoint=target, insecure=True, compression=compression, timeout=10)
    try:
        # The SDK's gRPC exporter blocks; keep the sidecar's loop (this test's loop) free while it calls.
        result = await asyncio.to_thread(exporter.export, spans)
    finally:
        exporter.shutdown()
    assert result == SpanExportResult.SUCCESS

    body = await _stats(http, server, model="llama", window="1m")
    (s,) = body["stats"]
    assert s["requests"] == 100
    assert s["latency_s"]["max"] == pytest.approx(1.0)
    vllm = await _stats(http, server, model="muai-orchestrator")
    assert {x["operation"] for x in vllm["stats"]} == {"text_completion"}
    assert state.metrics.spans_received._value.get() == 101
    assert state.registry.get_sample_value("muai_sidecar_export_requests_total", {"encoding": "grpc", "code": "200"}) == 1


async def test_partial_success_counts_rejected_spans(start_sidecar):
    _, state, target = await _grpc_sidecar(start_sidecar)
    f = SpanFactory()
    f.request(0.1)
    f.request(0.2)
    request = encode_spans(f.take())
    request.resource_spans[0].scope_spans[0].spans[0].trace_id = b"short"
    response = ExportTraceServiceResponse.FromString(await _raw_export(target, request.SerializeToString()))
    assert response.partial_success.rejected_spans == 1
    assert "invalid trace_id" in response.partial_success.error_message
    assert state.metrics.spans_rejected._value.get() == 1


async def test_garbage_bodies_get_grpc_errors_never_a_crash(start_sidecar, http):
    server, state, target = await _grpc_sidecar(start_sidecar, receiver={"max_body_bytes": 64 * 1024})
    with pytest.raises(aio.AioRpcError) as info:
        await _raw_export(target, b"\xff\xff\xff\xff")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a protobuf" in info.value.details()

    with pytest.raises(aio.AioRpcError) as info:
        await _raw_export(target, b"\x0a" + b"\xff" * 10 + b"\x01" * (128 * 1024))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # receiver.max_body_bytes

    rng = random.Random(16)
    f = SpanFactory()
    f.request(0.1)
    valid = encode(f.take())
    codes = set()
    for i in range(200):  # random bytes, and a valid message with bytes flipped (wrong lengths, tags, types)
        if i % 2:
            body = rng.randbytes(rng.randrange(0, 300))
        else:
            raw = bytearray(valid)
            for _ in range(rng.randrange(1, 6)):
                raw[rng.randrange(len(raw))] = rng.randrange(256)
            body = bytes(raw[: rng.randrange(1, len(raw) + 1)])
        try:
            ExportTraceServiceResponse.FromString(await _raw_export(target, body))
            codes.add(grpc.StatusCode.OK)
        except aio.AioRpcError as exc:
            codes.add(exc.code())
    assert codes <= {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}
    assert grpc.StatusCode.INVALID_ARGUMENT in codes

    # Still serving, on both transports, and healthy.
    assert ExportTraceServiceResponse.FromString(await _raw_export(target, valid)) == ExportTraceServiceResponse()
    async with http.get(server.make_url("/health")) as resp:
        assert resp.status == 200 and "otlp_grpc" not in (await resp.json()).get("degraded", {})
    bad = state.registry.get_sample_value("muai_sidecar_export_requests_total", {"encoding": "grpc", "code": "400"})
    assert bad and bad >= 1


async def test_taken_port_degrades_but_serves_http(start_sidecar, http):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server, state = await start_sidecar(quiet_config(otlp_grpc_port=port))
        assert state.otlp_grpc is None
        assert "otlp_grpc" in state.loop_errors
        async with http.get(server.make_url("/health")) as resp:
            body = await resp.json()
        assert "otlp_grpc" in str(body)


async def test_stops_with_the_app(start_sidecar):
    server, state, target = await _grpc_sidecar(start_sidecar)
    receiver = state.otlp_grpc
    await server.close()
    assert state.otlp_grpc is None and receiver._server is None
    with pytest.raises(aio.AioRpcError) as info:
        await _raw_export(target, b"")
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_vllm_shaped_spans_are_named_by_otel_service_name(start_sidecar, http, monkeypatch):
    # What docs/deployment.md tells an operator: OTEL_SERVICE_NAME names vLLM's llm_request spans' model.
    monkeypatch.setenv("OTEL_SERVICE_NAME", "llama-3.1-8b")
    server, _, target = await _grpc_sidecar(start_sidecar)
    provider = TracerProvider(resource=Resource.create(), shutdown_on_exit=False)  # the SDK reads the variable
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    span = provider.get_tracer("vllm").start_span("llm_request", kind=SpanKind.SERVER,
                                                  attributes={"gen_ai.latency.e2e": 0.25})
    span.end()
    exporter = OTLPSpanExporter(endpoint=target, insecure=True, timeout=10)
    try:
        assert await asyncio.to_thread(exporter.export, memory.get_finished_spans()) == SpanExportResult.SUCCESS
    finally:
        exporter.shutdown()
    (s,) = (await _stats(http, server, model="llama-3.1-8b", window="1m"))["stats"]
    assert (s["operation"], s["requests"], s["latency_s"]["p50"]) == ("text_completion", 1, 0.25)


@pytest.mark.slow
async def test_vllms_engine_exporting_on_its_default_grpc_reaches_the_stats(start_sidecar, http, tmp_path):
    # vLLM exports over OTLP/gRPC unless told otherwise: an operator pointing it at the sidecar changes nothing else.
    pytest.importorskip("vllm")
    import os
    import sys
    from pathlib import Path

    from adapters.tiny import build_tiny_model

    root = Path(__file__).resolve().parents[2]
    model_dir = build_tiny_model("tiny-llama", tmp_path / "tiny-llama")
    server, _, target = await _grpc_sidecar(start_sidecar)
    env = {k: v for k, v in os.environ.items() if k != "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"}
    env.update(OTEL_SERVICE_NAME="tiny-vllm", VLLM_TARGET_DEVICE="cpu")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(root / "tests/adapters/dist/vllm_trace.py"), "--model", str(model_dir),
        "--endpoint", f"http://{target}", "--protocol", "grpc", "--out", str(tmp_path / "ids.json"),
        cwd=root, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    log, _ = await asyncio.wait_for(proc.communicate(), 300)
    assert proc.returncode == 0, log.decode(errors="replace")[-3000:]

    async def counted():
        stats = (await _stats(http, server, model="tiny-vllm", window="5m"))["stats"]
        return stats if stats and stats[0]["requests"] >= 2 else None

    from support.waiting import apoll

    (s,) = await apoll(counted, timeout=60, what="vLLM's two llm_request spans in the sidecar's stats")
    assert s["requests"] == 2 and s["errors"] == 0 and s["latency_s"]["p50"] > 0
