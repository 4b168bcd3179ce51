"""Tracing: the sampler, export failure handling with the real OTLP exporter, and the span tree a real OTLP/HTTP
receiver sees for a workflow request through the real server."""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from test_server_support import OtlpReceiver, attrs, echo_config, free_port, poll, running_app

from orchestrator.config import TracingConfig
from orchestrator.tracing import (
    AdjustableRatioSampler,
    UNSAMPLED_SPAN,
    CountingSpanProcessor,
    ObservedSpanExporter,
    build_tracing,
    encode_threshold,
    extract_context,
    inject_headers,
    make_exporter,
    parse_threshold,
    probability_of,
    threshold_for,
)
from sidecar.otlp import adjusted_count

pytestmark = pytest.mark.timeout(120)
TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
PARENT_ID = 0x00F067AA0BA902B7
TRACEPARENT = f"00-{TRACE_ID:032x}-{PARENT_ID:016x}-01"
SERVER, INTERNAL = 2, 1


@pytest.fixture
async def receiver():
    r = await OtlpReceiver().start()
    yield r
    await r.stop()


def test_ratio_sampler_changes_at_runtime_and_parents_win():
    sampler = AdjustableRatioSampler(0.0)
    provider = TracerProvider(sampler=ParentBased(root=sampler), shutdown_on_exit=False)
    tracer = provider.get_tracer("t")
    assert not tracer.start_span("root").is_recording()
    parent = trace.set_span_in_context(NonRecordingSpan(SpanContext(TRACE_ID, PARENT_ID, True, TraceFlags(1))))
    assert tracer.start_span("child", context=parent).is_recording()  # a sampled parent is followed
    sampler.set_ratio(1.0)
    assert tracer.start_span("root").is_recording()
    with pytest.raises(ValueError):
        sampler.set_ratio(1.5)


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _th(span) -> str:
    ot = span.get_span_context().trace_state.get("ot")
    assert ot is not None and ot.startswith("th:"), ot
    return ot.split(";")[0][3:]


def test_thresholds_follow_the_specification():
    # The specification's examples: p = 1 -> "0", 1/2 -> "8", 1/4 -> "c", 2/3 -> "55" at 4 digits of precision.
    assert encode_threshold(threshold_for(1.0)) == "0"
    assert encode_threshold(threshold_for(0.5)) == "8"
    assert encode_threshold(threshold_for(0.25)) == "c"
    assert encode_threshold(threshold_for(0.1)) == "e666"
    for p in (1.0, 0.5, 0.25, 0.1, 0.013, 1e-4):
        th = encode_threshold(threshold_for(p))
        assert probability_of(parse_threshold(th)) == pytest.approx(p, rel=2e-4 / p + 1e-9)
        # The sidecar's reading of the same tracestate is 1/p of the very threshold that decided.
        assert adjusted_count(f"vendor=x,ot=th:{th};rv:00000000000001") == pytest.approx(1 / probability_of(parse_threshold(th)))
    assert parse_threshold("") is None and parse_threshold("xyz") is None and parse_threshold("0" * 15) is None
    assert adjusted_count("ot=th:zz") == 1.0 and adjusted_count("other=th:8") == 1.0


def test_consistent_decisions_carry_their_threshold_and_children_inherit_it():
    sampler = AdjustableRatioSampler(0.25)
    provider = TracerProvider(sampler=ParentBased(root=sampler), shutdown_on_exit=False)
    tracer = provider.get_tracer("t")
    kept = 0
    for _ in range(4000):
        root = tracer.start_span("root")
        randomness = root.get_span_context().trace_id & ((1 << 56) - 1)
        # Consistent: kept exactly when the trace's randomness reaches the threshold of p.
        assert root.is_recording() == (randomness >= threshold_for(0.25))
        if root.is_recording():
            kept += 1
            assert _th(root) == "c"
            child = tracer.start_span("child", context=trace.set_span_in_context(root))
            assert child.is_recording() and _th(child) == "c"
    assert 850 < kept < 1150


def test_sampled_incoming_traceparent_stays_sampled_at_any_probability():
    sampler = AdjustableRatioSampler(0.0, budget_per_s=1.0)
    tracer = TracerProvider(sampler=ParentBased(root=sampler), shutdown_on_exit=False).get_tracer("t")
    ctx = extract_context({"traceparent": TRACEPARENT, "tracestate": "ot=th:8,vendor=a"})
    span = tracer.start_span("server", context=ctx)
    assert span.is_recording() and span.get_span_context().trace_state.get("ot") == "th:8"
    assert not tracer.start_span("new root").is_recording()


def test_probability_follows_the_traffic_within_the_budget():
    clock = _Clock()
    sampler = AdjustableRatioSampler(1.0, budget_per_s=50.0, clock=clock)
    # Below the budget: every request.
    for second in range(3):
        for i in range(40):
            clock.now = 1000.0 + second + i / 40
            assert sampler.probability() == 1.0
    # 1000 requests per second: the probability falls to keep about 50 per second.
    tracer = TracerProvider(sampler=ParentBased(root=sampler), shutdown_on_exit=False).get_tracer("t")
    kept, weight = [], []
    for second in range(3, 13):
        sampled = 0
        for i in range(1000):
            clock.now = 1000.0 + second + i / 1000
            span = tracer.start_span("r")
            if span.is_recording():
                sampled += 1
                weight.append(adjusted_count(f"ot={span.get_span_context().trace_state.get('ot')}"))
        kept.append(sampled)
    assert all(k < 400 for k in kept[:1]) and all(20 <= k <= 90 for k in kept[1:]), kept
    # The adjusted counts add up to the requests they stand for.
    assert sum(weight) == pytest.approx(10_000, rel=0.15)
    # Traffic gone quiet: back to every request.
    clock.now += 30
    sampler.probability()
    clock.now += 1.5
    assert sampler.probability() == 1.0


def test_default_config_samples_adaptively():
    tracing = build_tracing(TracingConfig(endpoint="http://127.0.0.1:9/v1/traces"), exporter=InMemorySpanExporter())
    try:
        assert tracing.sampler.budget_per_s == TracingConfig().sampling_budget_per_s == 100.0
        assert tracing.sampler.ratio == 1.0
    finally:
        tracing.shutdown(1)


def test_w3c_context_in_and_out():
    ctx = extract_context({"traceparent": TRACEPARENT})
    span_context = trace.get_current_span(ctx).get_span_context()
    assert (span_context.trace_id, span_context.span_id) == (TRACE_ID, PARENT_ID)
    headers = inject_headers({}, ctx)
    assert headers["traceparent"] == TRACEPARENT
    assert not trace.get_current_span(extract_context({"traceparent": "garbage"})).get_span_context().is_valid


def test_disabled_tracing_is_a_no_op():
    tracing = build_tracing(TracingConfig(enabled=False))
    assert not tracing.enabled
    assert not tracing.tracer.start_span("x").is_recording()


def test_grpc_exporter_is_built_for_grpc_protocol():
    exporter = make_exporter(TracingConfig(protocol="grpc", endpoint="http://127.0.0.1:4317"))
    assert type(exporter).__module__.startswith("opentelemetry.exporter.otlp.proto.grpc")
    exporter.shutdown()
    with pytest.raises(ValueError):
        make_exporter(TracingConfig(endpoint="not a url"))


async def test_export_failures_are_counted_logged_once_and_recover(receiver, caplog):
    config = TracingConfig(endpoint=f"http://127.0.0.1:{free_port()}/v1/traces", export_timeout_s=0.5)
    failures: list[int] = []
    health: list[str | None] = []
    down = ObservedSpanExporter(make_exporter(config), endpoint=config.endpoint, on_failure=failures.append,
                                on_health=health.append, log_period_s=3600)
    span = TracerProvider(shutdown_on_exit=False).get_tracer("t").start_span("s")
    span.end()
    with caplog.at_level(logging.WARNING, logger="orchestrator.tracing"):
        for _ in range(3):
            assert await asyncio.to_thread(down.export, [span]) is SpanExportResult.FAILURE
    assert failures == [1, 1, 1] and down.failing
    assert len([r for r in caplog.records if r.name == "orchestrator.tracing"]) == 1  # once per period
    assert "failing" in health[-1]
    # Same wrapper logic around an exporter that reaches a live receiver: success clears the problem.
    up = ObservedSpanExporter(make_exporter(TracingConfig(endpoint=receiver.endpoint)), on_health=health.append)
    up.failing = True
    assert await asyncio.to_thread(up.export, [span]) is SpanExportResult.SUCCESS
    assert health[-1] is None and not up.failing
    down.shutdown()
    up.shutdown()


class GatedExporter(SpanExporter):
    """Our sink in front of the SDK's in-memory exporter: each export waits until the test opens the gate."""

    def __init__(self) -> None:
        self.memory = InMemorySpanExporter()
        self.entered = threading.Event()
        self.gate = threading.Event()

    def export(self, spans):
        self.entered.set()
        self.gate.wait(30)
        return self.memory.export(spans)

    def shutdown(self) -> None:
        self.memory.shutdown()


def test_a_full_span_queue_counts_every_span_it_turns_away():
    exporter = GatedExporter()
    drops: list[tuple[int, str]] = []
    processor = CountingSpanProcessor(exporter, max_queue_size=2, max_export_batch_size=2, schedule_delay_millis=600_000,
                                      on_drop=lambda n, reason: drops.append((n, reason)))
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(processor)
    tracer = provider.get_tracer("t")
    for name in ("a", "b"):  # a full batch: the worker takes it and blocks in the exporter
        tracer.start_span(name).end()
    assert exporter.entered.wait(30)
    for name in ("c", "d", "e", "f"):  # room for two more while the exporter is stuck
        tracer.start_span(name).end()
    assert drops == [(1, "queue_full"), (1, "queue_full")] and processor.dropped == {"queue_full": 2}
    exporter.gate.set()
    provider.shutdown()
    assert sorted(s.name for s in exporter.memory.get_finished_spans()) == ["a", "b", "c", "d"]
    tracer.start_span("late").end()  # after shutdown: nowhere to go, counted
    assert drops[-1] == (1, "shutdown")


def traced_config(tmp_path, endpoint: str, **extra):
    return echo_config(tmp_path, telemetry={"tracing": {"enabled": True, "endpoint": endpoint, "export_timeout_s": 1.0}},
                       **extra)


async def flushed(state, receiver, trace_id: bytes, count: int):
    async def enough():
        await asyncio.to_thread(state.tracing.force_flush, 5.0)
        return len(receiver.by_trace(trace_id)) >= count and receiver.by_trace(trace_id)
    return await poll(enough, what=f"{count} spans at the receiver")


async def test_workflow_span_tree_reaches_a_real_otlp_receiver(tmp_path, receiver):
    config = traced_config(tmp_path, receiver.endpoint)
    async with running_app(config) as (client, state):
        resp = await client.post("/v1/workflows/embed_then_generate", headers={"traceparent": TRACEPARENT}, json={
            "parameters": {"query": "which colour", "documents": ["red green", "one two", "blue sky"],
                           "embed_model": "echo-embed", "generate_model": "echo", "max_new_tokens": 4}})
        body = await resp.json()
        assert resp.status == 200 and body["status"] == "success", body
        trace_id = TRACE_ID.to_bytes(16, "big")
        spans = await flushed(state, receiver, trace_id, 6)
    by_id = {s.span_id: s for s in spans}
    roots = [s for s in spans if s.parent_span_id == PARENT_ID.to_bytes(8, "big")]
    assert len(roots) == 1
    root = roots[0]
    assert root.kind == SERVER and root.name == "POST /v1/workflows/{name}"
    ra = attrs(root)
    assert ra["gen_ai.operation.name"] == "workflow" and ra["muai.request"] is True
    # A workflow names itself (docs/sidecar-api.md): no gen_ai.request.model on its root; the models it used.
    assert "gen_ai.request.model" not in ra and ra["muai.workflow"] == "embed_then_generate"
    assert ra["muai.workflow.models"] == ["echo-embed", "echo"]
    assert ra["http.response.status_code"] == 200 and ra["http.request.method"] == "POST"
    workflow = [s for s in spans if s.parent_span_id == root.span_id]
    assert [s.name for s in workflow] == ["workflow embed_then_generate"]
    steps = sorted((s for s in spans if s.parent_span_id == workflow[0].span_id), key=lambda s: s.start_time_unix_nano)
    assert [s.name for s in steps] == ["workflow.step embed", "workflow.step retrieve", "workflow.step generate"]
    inference = [s for s in spans if attrs(s).get("muai.batch_size") is not None]
    assert sorted(s.name for s in inference) == ["embeddings echo-embed", "text_completion echo"]
    for span in inference:
        parent = by_id[span.parent_span_id]
        assert parent.name in ("workflow.step embed", "workflow.step generate")
        a = attrs(span)
        assert span.kind == INTERNAL
        assert a["gen_ai.request.model"] in ("echo", "echo-embed") and a["muai.engine"] == "echo"
        assert a["muai.fallback"] is False and a["gen_ai.usage.input_tokens"] >= 1
        assert span.end_time_unix_nano >= span.start_time_unix_nano
    generate = next(s for s in inference if s.name == "text_completion echo")
    ga = attrs(generate)
    assert by_id[generate.parent_span_id].name == "workflow.step generate"
    assert ga["gen_ai.usage.output_tokens"] >= 1 and ga["muai.cache_hit"] is False
    assert ga["gen_ai.response.finish_reasons"] in (["stop"], ["length"])


async def test_chat_request_span_and_errors_on_the_root(tmp_path, receiver):
    config = traced_config(tmp_path, receiver.endpoint, models=[
        {"name": "echo", "path": str(tmp_path), "engine": "echo", "inject_delay_s": 1.0}],
        server={"request_timeout_s": 0.3})
    async with running_app(config) as (client, state):
        resp = await client.post("/v1/chat/completions", headers={"traceparent": TRACEPARENT}, json={
            "model": "echo", "messages": [{"role": "user", "content": "hi"}]})
        assert resp.status == 504
        spans = await flushed(state, receiver, TRACE_ID.to_bytes(16, "big"), 1)
    root = next(s for s in spans if s.kind == SERVER)
    a = attrs(root)
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.request.model"] == "echo"
    assert a["http.response.status_code"] == 504 and a["error.type"] == "504"
    assert root.status.code == 2  # ERROR


async def test_rejected_requests_are_not_counted_as_requests(tmp_path, receiver):
    async with running_app(traced_config(tmp_path, receiver.endpoint)) as (client, state):
        resp = await client.post("/v1/completions", headers={"traceparent": TRACEPARENT}, json={"model": "nope", "prompt": "x"})
        assert resp.status == 404
        spans = await flushed(state, receiver, TRACE_ID.to_bytes(16, "big"), 1)
    a = attrs(spans[0])
    assert "gen_ai.operation.name" not in a and a["http.response.status_code"] == 404


async def test_serving_is_unaffected_with_the_collector_down(tmp_path):
    config = traced_config(tmp_path, f"http://127.0.0.1:{free_port()}/v1/traces")
    async with running_app(config) as (client, state):
        for _ in range(5):
            resp = await client.post("/v1/completions", json={"model": "echo", "prompt": "a b"})
            assert resp.status == 200
        await asyncio.to_thread(state.tracing.force_flush, 5.0)

        async def reported():
            body = await (await client.get("/health/ready")).json()
            return any("trace export" in d for d in body["degraded"]) and body
        body = await poll(reported, what="the exporter failure in readiness")
        assert body["ready"] is True
        failures = state.metrics.registry.get_sample_value("muai_telemetry_export_failures_total", {"signal": "traces"})
        assert failures >= 1
        dropped = state.metrics.registry.get_sample_value("muai_telemetry_spans_dropped_total", {"reason": "export_failed"})
        assert dropped >= failures  # every failed batch carried at least one span


def test_lean_tracer_builds_nothing_for_unsampled_requests():
    from opentelemetry.sdk.trace import SpanProcessor

    class Counting(SpanProcessor):
        started = 0

        def on_start(self, span, parent_context=None):
            Counting.started += 1

    tracing = build_tracing(TracingConfig(endpoint="http://127.0.0.1:9/v1/traces", sampling_ratio=0.0),
                            exporter=InMemorySpanExporter())
    try:
        tracing.provider.add_span_processor(Counting())
        tracer = tracing.tracer
        for _ in range(100):
            with tracer.start_as_current_span("POST /v1/chat/completions", context=extract_context({})) as root:
                assert not root.is_recording() and root.get_span_context().is_valid
                child = tracer.start_span("generate m")
                assert child is root  # the unsampled parent stands in: no new span object
                with tracer.start_as_current_span("step") as step:
                    assert step is root and trace.get_current_span() is root
                headers = inject_headers({})
                assert headers["traceparent"].endswith("-00")  # still propagated, as not sampled
                # ... under a trace id of its own each time: no two requests share one downstream.
                assert inject_headers({})["traceparent"][3:35] != headers["traceparent"][3:35]
            assert not trace.get_current_span().get_span_context().is_valid  # detached again
        assert Counting.started == 0
        # A sampled incoming traceparent is still followed through the lean tracer, children included.
        with tracer.start_as_current_span("server", context=extract_context({"traceparent": TRACEPARENT})) as root:
            assert root.is_recording() and root.get_span_context().trace_id == TRACE_ID
            assert tracer.start_span("child").is_recording()
        assert Counting.started == 2
    finally:
        tracing.shutdown(1)


def test_lean_tracer_decides_each_new_trace_once():
    tracing = build_tracing(TracingConfig(endpoint="http://127.0.0.1:9/v1/traces", sampling_ratio=0.5,
                                          sampling_budget_per_s=None), exporter=InMemorySpanExporter())
    try:
        kept = 0
        for _ in range(2000):
            with tracing.tracer.start_as_current_span("r") as span:
                if span.is_recording():
                    # The trace id the SDK built the span with carries the randomness the decision was made on.
                    assert span.get_span_context().trace_id & ((1 << 56) - 1) >= threshold_for(0.5)
                    assert _th(span) == "8"
                    kept += 1
                else:
                    # A dropped trace builds nothing of its own: the one shared stand-in is current.
                    assert span is UNSAMPLED_SPAN and trace.get_current_span() is UNSAMPLED_SPAN
        assert 850 < kept < 1150
    finally:
        tracing.shutdown(1)


async def test_a_sampled_request_links_its_latency_to_its_trace_with_an_openmetrics_exemplar(tmp_path, receiver):
    unsampled_id = 0x11112222333344445555666677778888
    async with running_app(traced_config(tmp_path, receiver.endpoint)) as (client, state):
        resp = await client.post("/v1/completions", headers={"traceparent": TRACEPARENT},
                                 json={"model": "echo", "prompt": "a b c", "max_tokens": 2})
        assert resp.status == 200
        resp = await client.post("/v1/completions", headers={"traceparent": f"00-{unsampled_id:032x}-{PARENT_ID:016x}-00"},
                                 json={"model": "echo", "prompt": "a b c", "max_tokens": 2})
        assert resp.status == 200
        resp = await client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
        openmetrics = await resp.text()
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("application/openmetrics-text")
        plain = await (await client.get("/metrics")).text()
    exemplars = [line for line in openmetrics.splitlines()
                 if line.startswith("muai_request_latency_seconds_bucket") and " # {" in line]
    assert len(exemplars) == 1 and f'trace_id="{TRACE_ID:032x}"' in exemplars[0]
    assert f"{unsampled_id:032x}" not in openmetrics  # an unsampled request has no trace to link to
    assert " # {" not in plain  # the Prometheus text format has no exemplars: it stays as it was
