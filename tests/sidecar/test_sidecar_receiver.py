"""The OTLP/HTTP receiver and the query API, fed by the real OpenTelemetry SDK exporter."""

from __future__ import annotations

import asyncio
import gzip
import json
import random

import numpy as np
import pytest
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExportResult
from opentelemetry.trace import SpanKind

from sidecar_helpers import SpanFactory, encode, to_otlp_json
from support.waiting import apoll

PB = {"Content-Type": "application/x-protobuf"}


async def _stats(http, server, **params):
    async with http.get(server.make_url("/api/v1/stats"), params=params) as resp:
        return resp.status, await resp.json()


@pytest.mark.parametrize("compression", [Compression.NoCompression, Compression.Gzip])
async def test_real_otlp_exporter_percentiles_equal_numpy(start_sidecar, http, compression):
    server, state = await start_sidecar()
    rng = np.random.default_rng(11)
    durations = rng.lognormal(-1.5, 0.7, size=600)
    f = SpanFactory()
    for d in durations:
        f.request(float(d), model="llama", operation="chat")
    spans = f.take()
    exporter = OTLPSpanExporter(endpoint=str(server.make_url("/v1/traces")), compression=compression, timeout=10)
    try:
        # The SDK exporter is synchronous (requests); keep the server's loop free while it posts.
        results = [await asyncio.to_thread(exporter.export, spans[i : i + 200]) for i in range(0, 600, 200)]
    finally:
        exporter.shutdown()
    assert results == [SpanExportResult.SUCCESS] * 3

    status, body = await _stats(http, server, model="llama", window="1m")
    assert status == 200
    (s,) = body["stats"]
    exact = np.array([round(d * 1e9) for d in durations]) / 1e9  # what the spans carry: integer nanoseconds
    assert s["requests"] == 600 and s["error_bound"] == 0.0
    for name, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
        assert s["latency_s"][name] == pytest.approx(float(np.quantile(exact, q)), rel=1e-12, abs=1e-15)
    assert s["latency_s"]["max"] == pytest.approx(exact.max())
    assert (s["model"], s["operation"], s["scope"], s["window"]) == ("llama", "chat", "request", "1m")
    assert state.metrics.spans_received._value.get() == 600


async def test_batch_span_processor_end_to_end(start_sidecar, http):
    """The SDK's normal serving pipeline (BatchSpanProcessor + OTLP exporter) reaches the sidecar."""
    server, _ = await start_sidecar()
    provider = TracerProvider(resource=Resource.create({"service.name": "muai-orchestrator"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=str(server.make_url("/v1/traces")))))
    tracer = provider.get_tracer("test")

    def emit():
        for i in range(20):
            with tracer.start_as_current_span("POST /v1/embeddings", kind=SpanKind.SERVER) as root:
                root.set_attribute("gen_ai.operation.name", "embeddings")
                root.set_attribute("gen_ai.request.model", "minilm")
                with tracer.start_as_current_span("embeddings minilm", kind=SpanKind.CLIENT) as inner:
                    inner.set_attribute("gen_ai.operation.name", "embeddings")
                    inner.set_attribute("gen_ai.request.model", "minilm")
        provider.force_flush()
        provider.shutdown()

    await asyncio.to_thread(emit)
    status, body = await _stats(http, server, model="minilm", window="10s", scope="all")
    assert status == 200
    assert {(s["scope"], s["requests"]) for s in body["stats"]} == {("request", 20), ("inference", 20)}


async def test_json_and_gzip_encodings_and_responses(start_sidecar, http):
    server, _ = await start_sidecar()
    f = SpanFactory()
    f.request(0.5, model="j")
    doc = to_otlp_json(f.take())
    url = server.make_url("/v1/traces")
    async with http.post(url, data=json.dumps(doc), headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 200 and resp.content_type == "application/json"
        assert await resp.json() == {}
    f.request(1.5, model="j")
    body = gzip.compress(json.dumps(to_otlp_json(f.take())).encode())
    async with http.post(url, data=body, headers={"Content-Type": "application/json", "Content-Encoding": "gzip"}) as resp:
        assert resp.status == 200
    f.request(2.5, model="j")
    async with http.post(url, data=gzip.compress(encode(f.take())), headers={**PB, "Content-Encoding": "gzip"}) as resp:
        assert resp.status == 200 and resp.content_type == "application/x-protobuf"
        ExportTraceServiceResponse.FromString(await resp.read())
    _, stats = await _stats(http, server, model="j", window="10s")
    assert stats["stats"][0]["requests"] == 3 and stats["stats"][0]["latency_s"]["max"] == 2.5


async def test_partial_success_response(start_sidecar, http):
    server, state = await start_sidecar()
    f = SpanFactory()
    f.request(0.1)
    from sidecar.otlp import PROTOBUF, decode_request

    request, _ = decode_request(encode(f.take()), PROTOBUF)
    request.resource_spans[0].scope_spans[0].spans.add().CopyFrom(request.resource_spans[0].scope_spans[0].spans[0])
    request.resource_spans[0].scope_spans[0].spans[1].span_id = b"\x01"
    async with http.post(server.make_url("/v1/traces"), data=request.SerializeToString(), headers=PB) as resp:
        assert resp.status == 200
        answer = ExportTraceServiceResponse.FromString(await resp.read())
    assert answer.partial_success.rejected_spans == 1 and answer.partial_success.error_message


async def test_fuzzed_bodies_get_4xx_and_the_sidecar_keeps_serving(start_sidecar, http):
    # auto_decompress=False as serve() runs it: the receiver's own bounded gzip path is the one under test.
    server, _ = await start_sidecar(SidecarConfigSmall(), server_kwargs={"auto_decompress": False})
    url = server.make_url("/v1/traces")
    rng = random.Random(5)
    f = SpanFactory()
    for i in range(10):
        f.request(0.01 * (i + 1), attributes={"gen_ai.usage.input_tokens": i})
    valid = encode(f.take())
    cases = [(bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 3000))), PB) for _ in range(60)]
    cases += [(valid[: rng.randint(1, len(valid) - 1)], PB) for _ in range(30)]
    cases += [(valid[:-1], PB)]
    statuses = []
    for body, headers in cases:
        async with http.post(url, data=body, headers=headers) as resp:
            statuses.append(resp.status)
            await resp.read()
    # Random bytes can happen to be a valid (empty-ish) protobuf message; what matters is: never a 5xx.
    assert all(s in (200, 400) for s in statuses), statuses
    assert statuses[-1] == 400  # cut inside the last span
    assert statuses.count(400) > len(cases) // 2

    for headers, expected in (
        ({"Content-Type": "text/plain"}, 415),
        ({}, 415),
        ({**PB, "Content-Encoding": "compress"}, 415),
        ({"Content-Type": "application/json"}, 400),
    ):
        async with http.post(url, data=valid, headers=headers) as resp:
            assert resp.status == expected, headers
            body = await resp.read()
            assert body
    for broken in (b"\x1f\x8b\x08garbage", gzip.compress(valid)[:-12], b"\x08\x96\x01 not gzip"):
        async with http.post(url, data=broken, headers={**PB, "Content-Encoding": "gzip"}) as resp:
            assert resp.status == 400, broken
    async with http.post(url, data=b"x" * 5000, headers=PB) as resp:
        assert resp.status == 413
    bomb = gzip.compress(b"\0" * 200_000)
    async with http.post(url, data=bomb, headers={**PB, "Content-Encoding": "gzip"}) as resp:
        assert resp.status == 413

    # An absurd Content-Length is refused before any body is read.
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(
        b"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\n"
        b"Content-Length: 99999999999999999\r\n\r\nabc"
    )
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 10)
    writer.close()
    assert status_line.split()[1] == b"413"

    async with http.get(server.make_url("/health")) as resp:
        assert resp.status == 200
    async with http.post(url, data=valid, headers=PB) as resp:
        assert resp.status == 200
    async with http.get(server.make_url("/metrics")) as resp:
        text = await resp.text()
    assert 'muai_sidecar_export_requests_total{code="400",encoding="protobuf"}' in text
    assert 'muai_sidecar_export_requests_total{code="413",encoding="protobuf"}' in text


def SidecarConfigSmall():
    from sidecar_helpers import quiet_config

    return quiet_config(receiver={"max_body_bytes": 4096, "max_decompressed_bytes": 100_000})


async def test_query_api_errors_and_filters(start_sidecar, http):
    server, _ = await start_sidecar()
    f = SpanFactory()
    f.request(0.2, model="a", operation="chat")
    f.request(0.4, model="b", operation="embeddings")
    async with http.post(server.make_url("/v1/traces"), data=encode(f.take()), headers=PB) as resp:
        assert resp.status == 200
    status, body = await _stats(http, server)
    assert status == 200 and len(body["stats"]) == 6 and body["windows"] == {"10s": 10.0, "1m": 60.0, "5m": 300.0}
    status, body = await _stats(http, server, operation="embeddings", window="5m")
    assert [(s["model"], s["window"]) for s in body["stats"]] == [("b", "5m")]
    status, body = await _stats(http, server, window="1h")
    assert status == 422 and body["error"]["windows"] == ["10s", "1m", "5m"]
    status, body = await _stats(http, server, model="nope")
    assert status == 404 and "nope" in body["error"]["message"]
    status, body = await _stats(http, server, scope="weird")
    assert status == 422
    async with http.get(server.make_url("/api/v1/nothing")) as resp:
        assert resp.status == 404 and (await resp.json())["error"]["code"] == 404
    async with http.get(server.make_url("/v1/traces")) as resp:
        assert resp.status == 405


async def test_forwarding_reexports_batches_to_another_otlp_endpoint(start_sidecar, http):
    """A second sidecar stands in as the tracing backend: what the first receives arrives there too."""
    backend, backend_state = await start_sidecar()
    from sidecar_helpers import quiet_config

    front, front_state = await start_sidecar(quiet_config(forwarding={"endpoint": str(backend.make_url("/v1/traces"))}))
    f = SpanFactory()
    for _ in range(7):
        f.request(0.3, model="fwd")
    async with http.post(front.make_url("/v1/traces"), data=encode(f.take()), headers=PB) as resp:
        assert resp.status == 200
    await apoll(lambda: backend_state.monitor.samples == 7)
    await apoll(lambda: front_state.forwarder.sent == 1)
    assert front_state.forwarder.dropped == 0


async def test_forwarding_to_a_dead_endpoint_never_blocks_ingestion(start_sidecar, http, unused_tcp_port):
    from sidecar_helpers import quiet_config

    server, state = await start_sidecar(
        quiet_config(forwarding={"endpoint": f"http://127.0.0.1:{unused_tcp_port}/v1/traces", "queue_size": 2, "timeout_s": 1})
    )
    f = SpanFactory()
    f.request(0.1)
    body = encode(f.take())
    for _ in range(10):
        async with http.post(server.make_url("/v1/traces"), data=body, headers=PB) as resp:
            assert resp.status == 200
    assert state.forwarder.dropped >= 1
    assert state.monitor.samples == 10
    await apoll(lambda: state.forwarder.failed >= 1)


async def test_forwarding_queue_is_bounded_in_bytes_too(start_sidecar):
    """queue_size counts batches, and one batch may be tens of MiB: queue_bytes bounds the memory it holds."""
    from sidecar.config import ForwardingConfig
    from sidecar.forwarding import Forwarder

    backend, backend_state = await start_sidecar()
    f = SpanFactory()
    for _ in range(4):
        f.request(0.2, model="bytes", attributes={"padding": "x" * 200})
    batch = encode(f.take())
    forwarder = Forwarder(ForwardingConfig(endpoint=str(backend.make_url("/v1/traces")), queue_size=100, queue_bytes=4096))
    fits = 4096 // len(batch)
    assert 1 <= fits < 6
    assert [forwarder.submit(batch) for _ in range(6)] == [True] * fits + [False] * (6 - fits)
    assert (forwarder.queued, forwarder.queued_bytes, forwarder.dropped) == (fits, fits * len(batch), 6 - fits)
    worker = asyncio.create_task(forwarder.run())
    try:
        await apoll(lambda: forwarder.sent == fits, what="the queued batches forwarded")
        assert forwarder.queued_bytes == 0
        assert forwarder.submit(batch)  # room again once the worker has taken them
        await apoll(lambda: forwarder.sent == fits + 1)
    finally:
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)
    assert backend_state.monitor.samples == 4 * (fits + 1)
