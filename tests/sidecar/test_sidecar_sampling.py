"""Sampled traces still count right: adjusted counts (1/p from ``ot=th:``) summed and weighted by the monitor.

End to end: the orchestrator's consistent probability sampler decides (in a real SDK provider, and in the
orchestrator's own lean tracer), the real OTLP/HTTP exporter posts the kept spans (the SDK's, and the
orchestrator's), and the real sidecar (on a clock the test advances) reports the counts.
"""

from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import ParentBased
from opentelemetry.trace import SpanKind

from orchestrator.config import TracingConfig
from orchestrator.otlp_export import OtlpHttpSpanExporter
from orchestrator.tracing import AdjustableRatioSampler, build_tracing
from sidecar.monitor import PerformanceMonitor, SeriesKey, weighted_quantiles
from sidecar.otlp import REQUEST, SpanSample

T0 = 1_700_000_000_000_000_000


class _SeededIds(IdGenerator):
    """Random ids from a seeded generator: the sampling outcome, and so the test, is the same on every run."""

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)

    def generate_span_id(self) -> int:
        return self._rng.getrandbits(64) or 1

    def generate_trace_id(self) -> int:
        return self._rng.getrandbits(128) or 1


class _Clock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1e3, allow_nan=False), st.integers(1, 5)), min_size=1, max_size=100))
def test_weighted_quantiles_are_numpys_linear_over_the_requests_stood_for(samples):
    values = np.array([v for v, _ in samples])
    weights = np.array([w for _, w in samples], dtype=float)
    qs = [0.0, 0.5, 0.95, 0.99, 1.0]
    # Weight 1: numpy's linear definition itself; weight k: the same over each value repeated k times.
    assert weighted_quantiles(values, np.ones(values.size), qs) == pytest.approx(
        list(np.quantile(values, qs)), rel=1e-9, abs=1e-9)
    assert weighted_quantiles(values, weights, qs) == pytest.approx(
        list(np.quantile(np.repeat(values, weights.astype(int)), qs)), rel=1e-9, abs=1e-9)


def test_monitor_sums_weights_across_the_switch_to_sampling():
    monitor = PerformanceMonitor(windows={"1m": 60.0})
    key = SeriesKey(REQUEST, "m", "chat")
    for i in range(100):  # unsampled traffic first: weight 1
        monitor.record(SpanSample(REQUEST, "m", "chat", 0.1, error=i < 10), 10.0 + i * 0.1)
    for i in range(100):  # then one span in four, each standing for four requests
        monitor.record(SpanSample(REQUEST, "m", "chat", 0.3, error=i < 5, weight=4.0), 30.0 + i * 0.1)
    s = monitor.series_stats(key, "1m", 45.0)
    assert s.requests == 500 and s.throughput_rps == pytest.approx(500 / 60)
    assert s.errors == 10 + 20 and s.error_ratio == pytest.approx(30 / 500)
    assert s.latency.mean == pytest.approx((100 * 0.1 + 400 * 0.3) / 500)
    assert (s.requests_total, s.errors_total) == (500, 30)
    assert s.sampled == 100 and s.to_json()["sampling"]["effective_samples"] == pytest.approx(100)
    monitor.track_slo("m", 0.2)
    monitor.record(SpanSample(REQUEST, "m", "chat", 0.1, error=False, weight=4.0), 46.0)
    # Weighted over the samples kept since the first weight: 1 met of 101 spans, weight 4 of 404.
    assert monitor.slo_attainment(key, "1m", 46.0) == pytest.approx(4 / 404)


class _SdkPipeline:
    """Any OpenTelemetry SDK: our sampler in the SDK's provider, the SDK's OTLP/HTTP exporter."""

    def __init__(self, endpoint: str) -> None:
        self.sampler = AdjustableRatioSampler(0.25)
        self.memory = InMemorySpanExporter()
        provider = TracerProvider(
            resource=Resource.create({"service.name": "muai-orchestrator"}), sampler=ParentBased(root=self.sampler),
            id_generator=_SeededIds(16), shutdown_on_exit=False,
        )
        provider.add_span_processor(SimpleSpanProcessor(self.memory))
        self.tracer = provider.get_tracer("tests.sampling")
        self.exporter = OTLPSpanExporter(endpoint=endpoint, timeout=30)

    def finished(self) -> list:
        spans = list(self.memory.get_finished_spans())
        self.memory.clear()
        return spans

    def close(self) -> None:
        self.exporter.shutdown()


class _OrchestratorPipeline(_SdkPipeline):
    """The orchestrator's own: its lean tracer (decisions on the random module's bits, seeded here) and its
    OTLP/HTTP exporter."""

    def __init__(self, endpoint: str) -> None:
        random.seed(16)
        self.memory = InMemorySpanExporter()
        self.tracing = build_tracing(TracingConfig(endpoint=endpoint, sampling_ratio=0.25, sampling_budget_per_s=None),
                                     exporter=self.memory)
        self.sampler = self.tracing.sampler
        self.tracer = self.tracing.tracer
        self.exporter = OtlpHttpSpanExporter(endpoint, timeout_s=30)

    def finished(self) -> list:
        self.tracing.force_flush(30)
        return super().finished()

    def close(self) -> None:
        super().close()
        self.tracing.shutdown(1)


@pytest.mark.parametrize("pipeline", [_SdkPipeline, _OrchestratorPipeline], ids=["sdk", "orchestrator"])
async def test_sampled_requests_through_the_real_exporter_count_within_two_percent(start_sidecar, http, pipeline):
    clock = _Clock()
    server, state = await start_sidecar(clock=clock)
    spans_of = pipeline(str(server.make_url("/v1/traces")))
    sampler, tracer, exporter = spans_of.sampler, spans_of.tracer, spans_of.exporter

    rng = np.random.default_rng(16)
    total, batches = 60_000, 12
    # Two traffic levels, so the spans carry two thresholds and the percentiles must be weighted to come out
    # right: a slow phase kept at 1 in 4, then a fast one kept at 1 in 10.
    durations = np.concatenate([rng.lognormal(-1.0, 0.5, total // 2), rng.lognormal(-2.5, 0.5, total // 2)])
    attributes = {"gen_ai.operation.name": "chat", "gen_ai.request.model": "llama", "muai.request": True}
    per_batch = total // batches
    kept: list[float] = []
    try:
        for b in range(batches):
            if b == batches // 2:
                sampler.set_ratio(0.1)
            for d in durations[b * per_batch : (b + 1) * per_batch]:
                span = tracer.start_span("POST /v1/chat/completions", kind=SpanKind.SERVER, start_time=T0,
                                         attributes=attributes)
                span.end(end_time=T0 + int(d * 1e9))
            spans = spans_of.finished()
            kept.extend((sp.end_time - sp.start_time) / 1e9 for sp in spans)
            # The exporters block (requests); the sidecar is served from this test's loop.
            assert await asyncio.to_thread(exporter.export, spans) == SpanExportResult.SUCCESS
            clock.now += 5.0  # twelve batches over one minute
    finally:
        spans_of.close()

    clock.now -= 4.0  # every batch is inside the last minute
    async with http.get(server.make_url("/api/v1/stats"), params={"model": "llama", "window": "1m"}) as resp:
        (s,) = (await resp.json())["stats"]
    sampled = s["sampling"]["spans"]
    assert 0.15 * total < sampled < 0.2 * total  # about 1/4 + 1/10 of half each
    assert s["requests"] == pytest.approx(total, rel=0.02)
    assert s["throughput_rps"] == pytest.approx(total / 60.0, rel=0.02)
    assert s["totals"]["requests"] == pytest.approx(total, rel=0.02)
    # Percentiles within the stated sampling error: where each reported quantile falls in the true
    # distribution is within a few rank errors of q (3 standard errors at the median, the widest).
    rank_error = s["sampling"]["rank_error"]
    assert 0 < rank_error < 0.01
    truth = np.sort(np.floor(durations * 1e9) / 1e9)
    for name, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
        rank = np.searchsorted(truth, s["latency_s"][name]) / total
        assert abs(rank - q) <= 3 * rank_error, (name, rank, q, rank_error)
    # Unweighted, the slow phase's 1-in-4 spans outnumber the fast phase's 1-in-10: that median would be far off.
    naive_rank = np.searchsorted(truth, float(np.median(kept))) / total
    assert abs(naive_rank - 0.5) > 10 * rank_error


def test_the_detectors_read_the_adjusted_figures_of_a_sampled_series():
    # Fast requests sampled 1 in 10, slow ones kept every time: the spans alone say "mostly slow and failing",
    # the traffic they stand for is mostly fast and fine. The rules must judge the traffic.
    monitor = PerformanceMonitor(windows={"1m": 60.0})
    key = SeriesKey(REQUEST, "m", "chat")
    for i in range(100):
        monitor.record(SpanSample(REQUEST, "m", "chat", 0.05, error=False, weight=10.0), 10.0 + i * 0.1)
    for i in range(150):
        monitor.record(SpanSample(REQUEST, "m", "chat", 2.0, error=True, weight=1.0), 20.0 + i * 0.1)
    latency, error_ratio = monitor.latency_and_errors(key, "1m", 40.0)
    stats = monitor.series_stats(key, "1m", 40.0)
    assert latency.count == 1150 and latency.p50 == pytest.approx(0.05) and latency.p50 == stats.latency.p50
    assert error_ratio == pytest.approx(150 / 1150) and error_ratio == stats.error_ratio
    unsampled = PerformanceMonitor(windows={"1m": 60.0})
    unsampled.record(SpanSample(REQUEST, "m", "chat", 0.5, error=True), 10.0)
    assert unsampled.latency_and_errors(key, "1m", 11.0)[0].count == 1  # a series never sampled reads as before


def test_weighted_figures_follow_new_and_expiring_samples():
    # The weighted summary is cached per window; a new sample or one leaving the window must show at once.
    monitor = PerformanceMonitor(windows={"10s": 10.0})
    key = SeriesKey(REQUEST, "m", "chat")
    monitor.record(SpanSample(REQUEST, "m", "chat", 1.0, error=False, weight=2.0), 0.0)
    assert monitor.series_stats(key, "10s", 1.0).requests == 2
    assert monitor.series_stats(key, "10s", 1.0).requests == 2  # cached, same state
    monitor.record(SpanSample(REQUEST, "m", "chat", 3.0, error=True, weight=8.0), 5.0)
    s = monitor.series_stats(key, "10s", 5.0)
    assert (s.requests, s.errors) == (10, 8) and s.latency.p50 == pytest.approx(3.0)
    s = monitor.series_stats(key, "10s", 12.0)  # the first sample has left the window
    assert (s.requests, s.errors, s.sampled) == (8, 8, 1) and s.latency.p99 == 3.0
