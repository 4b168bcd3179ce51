"""ServerMetrics on a fresh registry per test: names, bound children, hooks, samplers, and promtool."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from orchestrator.metrics import (
    ResourceSampler,
    ServerMetrics,
    ThroughputWindow,
    normalise_engine_stats,
)


@pytest.fixture
def metrics() -> ServerMetrics:
    return ServerMetrics(CollectorRegistry())


def value(metrics: ServerMetrics, name: str, **labels) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_request_observations_land_on_bound_children(metrics):
    bound = metrics.model("m", "torch")
    assert metrics.model("m", "torch") is bound  # bound once, kept
    bound.observe(e2e_s=0.2, queue_s=0.01, prompt_tokens=5, completion_tokens=7, ttft_s=0.05, tpot_s=0.02)
    bound.observe(e2e_s=-1.0, queue_s=0.0)  # clamped at zero, never negative
    metrics.request_done("m", "chat", "ok")
    metrics.request_done("m", "chat", "timeout")
    assert value(metrics, "muai_request_latency_seconds_count", model="m", engine="torch") == 2
    assert value(metrics, "muai_request_latency_seconds_sum", model="m", engine="torch") == pytest.approx(0.2)
    assert value(metrics, "muai_request_queue_seconds_count", model="m", engine="torch") == 2
    assert value(metrics, "muai_time_to_first_token_seconds_count", model="m", engine="torch") == 1
    assert value(metrics, "muai_time_per_output_token_seconds_sum", model="m", engine="torch") == pytest.approx(0.02)
    assert value(metrics, "muai_prompt_tokens_total", model="m", engine="torch") == 5
    assert value(metrics, "muai_generation_tokens_total", model="m", engine="torch") == 7
    assert value(metrics, "muai_requests_total", model="m", operation="chat", status="ok") == 1
    assert value(metrics, "muai_requests_total", model="m", operation="chat", status="timeout") == 1


def test_batch_accounting_gives_mean_batch_size(metrics):
    for size in (4, 2, 6):
        metrics.on_batch("m", "torch", size)
    inferences = value(metrics, "muai_batch_inference_count_total", model="m", engine="torch")
    executions = value(metrics, "muai_batch_execution_count_total", model="m", engine="torch")
    assert (inferences, executions) == (12, 3)
    assert value(metrics, "muai_batch_size_bucket", model="m", engine="torch", le="4.0") == 2


def test_lifecycle_and_fallback(metrics):
    metrics.on_lifecycle("m", "load_start")
    metrics.on_lifecycle("m", "load_ok", engine="vllm", duration_s=3.5)
    assert value(metrics, "muai_model_loaded", model="m", engine="vllm") == 1
    metrics.on_fallback("m", "vllm", "torch", "inference_error")
    assert value(metrics, "muai_engine_fallbacks_total", model="m", **{"from": "vllm", "to": "torch"},
                 reason="inference_error") == 1
    assert value(metrics, "muai_model_loaded", model="m", engine="vllm") == 0
    assert value(metrics, "muai_model_loaded", model="m", engine="torch") == 1
    metrics.on_lifecycle("m", "unload", engine="torch")
    assert value(metrics, "muai_model_loaded", model="m", engine="torch") == 0
    assert value(metrics, "muai_model_load_seconds_sum", model="m", engine="vllm") == 3.5
    assert value(metrics, "muai_model_lifecycle_events_total", model="m", event="load_ok") == 1


def test_rejections_and_queue_gauges_read_at_scrape_time(metrics):
    metrics.reject("queue_full")
    metrics.reject("queue_full")
    depth = {"waiting": 3, "running": 1}
    metrics.bind_queue_gauges("m", lambda: depth["waiting"], lambda: depth["running"])
    assert value(metrics, "muai_rejected_requests_total", reason="queue_full") == 2
    assert value(metrics, "muai_rejected_requests_total", reason="draining") == 0
    assert value(metrics, "muai_requests_waiting", model="m") == 3
    depth["waiting"] = 0
    assert value(metrics, "muai_requests_waiting", model="m") == 0


def test_throughput_window_over_samples():
    window = ThroughputWindow(window_s=10)
    assert window.rate(0) == 0
    for t in range(0, 21):
        window.sample(float(t), t * 5)  # 5 requests per second
    assert window.rate(20.0) == pytest.approx(5.0)
    window.sample(30.0, 100)  # nothing new for 10 s
    assert window.rate(30.0) == pytest.approx(0.0)


def test_throughput_gauge_from_completed_requests(metrics):
    metrics.sample_throughput(0.0)
    for _ in range(10):
        metrics.request_done("m", "chat", "ok")
    metrics.sample_throughput(0.0)
    metrics.sample_throughput(2.0)
    assert value(metrics, "muai_throughput_requests_per_second", model="m") == pytest.approx(0.0)
    for _ in range(4):
        metrics.request_done("m", "chat", "ok")
    metrics.sample_throughput(4.0)
    assert value(metrics, "muai_throughput_requests_per_second", model="m") == pytest.approx(1.0)


def test_resources_and_engine_stats_exposed_from_snapshots(metrics):
    sampler = ResourceSampler()
    snapshot = sampler.sample()
    sampler.close()
    assert snapshot.cpu_seconds is not None and snapshot.cpu_seconds > 0
    assert snapshot.resident_bytes and snapshot.resident_bytes > 1024 * 1024
    metrics.set_resources(snapshot)
    metrics.set_engine_stats("m", {"kv_cache_hits": 3, "kv_cache_misses": 1, "kv_cache_bytes_held": 2048,
                                   "kv_cache_entries": 2, "kv_cache_evictions": 0, "prefix_cache_hits": 7,
                                   "prefix_cache_queries": 9, "hit_rate": 0.75})
    assert value(metrics, "muai_process_cpu_seconds_total") == pytest.approx(snapshot.cpu_seconds)
    assert value(metrics, "muai_process_resident_memory_bytes") == snapshot.resident_bytes
    assert value(metrics, "muai_kv_cache_hits_total", model="m") == 3
    assert value(metrics, "muai_kv_cache_bytes", model="m") == 2048
    assert value(metrics, "muai_prefix_cache_queries_total", model="m") == 9
    if not snapshot.gpu_used_bytes:  # no GPU here: the series is absent, not zero
        assert value(metrics, "muai_gpu_memory_used_bytes", gpu="0") is None


VLLM_STATS = {  # VllmEngine.stats(): counters accumulated, gauges latest
    "prefix_cache_queries": 10, "prefix_cache_hits": 4, "num_requests_running": 3, "num_requests_waiting": 2,
    "max_requests_running": 8, "num_preemptions": 1, "kv_cache_usage": 0.25, "prompt_tokens": 100,
    "generation_tokens": 50, "requests_finished": 7,
}


def test_vllm_scheduler_stats_are_exported_per_model_with_vllms_meanings(metrics):
    metrics.set_engine_stats("m", VLLM_STATS)
    assert value(metrics, "muai_engine_requests_running", model="m") == 3
    assert value(metrics, "muai_engine_requests_waiting", model="m") == 2
    assert value(metrics, "muai_engine_preemptions_total", model="m") == 1
    assert value(metrics, "muai_engine_kv_cache_usage_ratio", model="m") == 0.25
    assert value(metrics, "muai_prefix_cache_hits_total", model="m") == 4
    # Tokens are already counted per request (muai_prompt_tokens_total): the engine's own count is not doubled.
    assert "prompt_tokens" not in normalise_engine_stats(VLLM_STATS)


def test_span_drops_are_counted_by_reason_and_failed_batches_as_failures(metrics):
    metrics.trace_export_failed(7)
    metrics.on_spans_dropped(2, "queue_full")
    assert value(metrics, "muai_telemetry_export_failures_total", signal="traces") == 1
    assert value(metrics, "muai_telemetry_spans_dropped_total", reason="export_failed") == 7
    assert value(metrics, "muai_telemetry_spans_dropped_total", reason="queue_full") == 2


def test_normalise_engine_stats_maps_cache_stats_names():
    assert normalise_engine_stats({"hits": 1, "bytes_held": 5, "bogus": 3, "entries": True}) == {
        "kv_cache_hits": 1.0, "kv_cache_bytes": 5.0}


def test_failing_sampler_is_counted_and_reported_not_raised():
    problems = {}
    metrics = ServerMetrics(CollectorRegistry(), on_problem=lambda key, p: problems.__setitem__(key, p))
    metrics.sampler_failed("resources", RuntimeError("psutil broke"))
    assert value(metrics, "muai_telemetry_collector_errors_total", component="resources") == 1
    assert "psutil broke" in problems["metrics:resources"]
    metrics.sampler_ok("resources")
    assert problems["metrics:resources"] is None


def test_broken_snapshot_does_not_break_the_exposition():
    problems = {}
    metrics = ServerMetrics(CollectorRegistry(), on_problem=lambda key, p: problems.__setitem__(key, p))
    metrics.engine_stats = {"m": None}  # a corrupt snapshot: the collector must skip, not raise
    text = generate_latest(metrics.registry).decode()
    assert "muai_rejected_requests_total" in text
    assert value(metrics, "muai_telemetry_collector_errors_total", component="collector:snapshot") >= 1
    assert "TypeError" in problems["metrics:collector:snapshot"]
    metrics.engine_stats = {}
    generate_latest(metrics.registry)
    assert problems["metrics:collector:snapshot"] is None  # recovered, no longer reported


def test_two_instances_do_not_collide():
    a, b = ServerMetrics(CollectorRegistry()), ServerMetrics(CollectorRegistry())
    a.request_done("m", "chat", "ok")
    assert b.registry.get_sample_value("muai_requests_total", {"model": "m", "operation": "chat", "status": "ok"}) is None


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian prometheus) not installed")
def test_exposition_passes_promtool(metrics):
    bound = metrics.model("m", "torch")
    bound.observe(e2e_s=0.2, queue_s=0.01, prompt_tokens=5, completion_tokens=7, ttft_s=0.05, tpot_s=0.02)
    metrics.request_done("m", "chat", "ok")
    metrics.on_batch("m", "torch", 3)
    metrics.on_fallback("m", "vllm", "torch", "load_error")
    metrics.on_lifecycle("m", "load_ok", engine="torch", duration_s=1.0)
    metrics.bind_queue_gauges("m", lambda: 0, lambda: 1)
    metrics.set_resources(ResourceSampler().sample())
    metrics.set_engine_stats("m", {"kv_cache_hits": 1, "prefix_cache_hits": 2, "prefix_cache_queries": 3})
    metrics.set_engine_stats("v", VLLM_STATS)
    metrics.trace_export_failed(3)
    metrics.on_spans_dropped(1, "queue_full")
    metrics.sample_throughput(0.0)
    out = subprocess.run(["promtool", "check", "metrics"], input=generate_latest(metrics.registry),
                         capture_output=True, timeout=60)
    assert out.returncode == 0, (out.stdout + out.stderr).decode()
    assert not (out.stdout + out.stderr).strip(), (out.stdout + out.stderr).decode()


def test_request_series_are_exposed_exactly_as_prometheus_clients_own_histograms_would_be(metrics):
    # The request path keeps its own series (a lock and a bisect instead of prometheus_client's checks and locks
    # per call); what a scrape sees must be what prometheus_client's Histogram and Counter would have shown.
    from prometheus_client import Counter, Histogram

    from orchestrator.metrics import LATENCY_BUCKETS, QUEUE_BUCKETS

    reference = CollectorRegistry()
    latency = Histogram("muai_request_latency_seconds", "x", ["model", "engine"], registry=reference,
                        buckets=LATENCY_BUCKETS).labels("m", "torch")
    queue = Histogram("muai_request_queue_seconds", "x", ["model", "engine"], registry=reference,
                      buckets=QUEUE_BUCKETS).labels("m", "torch")
    done = Counter("muai_requests", "x", ["model", "operation", "status"], registry=reference)
    bound = metrics.model("m", "torch")
    # Values on bucket bounds, between them, zero and beyond the last bound.
    for e2e in (0.0, 0.005, 0.0051, 0.1, 0.75, 2.0, 960.0, 5000.0):
        bound.observe(e2e_s=e2e, queue_s=e2e / 10)
        latency.observe(e2e)
        queue.observe(e2e / 10)
        metrics.request_done("m", "chat", "ok")
        done.labels("m", "chat", "ok").inc()
    bound.observe_failed(e2e_s=0.3)
    latency.observe(0.3)
    metrics.request_done("m", "chat", "error")
    done.labels("m", "chat", "error").inc()

    def samples(registry, names):
        return sorted((s.name, tuple(sorted(s.labels.items())), s.value) for family in registry.collect()
                      for s in family.samples if family.name in names and not s.name.endswith("_created"))

    names = {"muai_request_latency_seconds", "muai_request_queue_seconds", "muai_requests"}
    ours = samples(metrics.registry, names)
    assert ours and ours == samples(reference, names)
