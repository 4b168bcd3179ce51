"""GET /metrics: the derived series, named as documented, and valid for promtool."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sidecar.collectors.gpu import GpuProcess, GpuSample
from sidecar_helpers import SpanFactory, encode, quiet_config
from support.waiting import apoll

PB = {"Content-Type": "application/x-protobuf"}


async def _scrape(http, server) -> str:
    async with http.get(server.make_url("/metrics")) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        return await resp.text()


async def test_metrics_exposition(start_sidecar, http, unused_tcp_port):
    config = quiet_config(
        forwarding={"endpoint": f"http://127.0.0.1:{unused_tcp_port}/v1/traces", "timeout_s": 1},
        detectors={"statistical": {"ewma": {"enabled": True, "warmup": 2}}},
    )
    server, state = await start_sidecar(config)
    f = SpanFactory()
    from opentelemetry import trace
    from opentelemetry.trace import SpanKind

    for d in (0.1, 0.2, 0.3, 0.4):
        root = f.request(d, model="llama", attributes={"gen_ai.latency.time_to_first_token": d / 10,
                                                      "gen_ai.usage.input_tokens": 10, "gen_ai.usage.output_tokens": 20})
        f.request(d / 2, model="llama", kind=SpanKind.CLIENT, parent=trace.set_span_in_context(root))
    f.request(0.5, model="llama", error=True)
    async with http.post(server.make_url("/v1/traces"), data=encode(f.take()), headers=PB) as resp:
        assert resp.status == 200
    # A GPU reading as NVML would give it (a real GpuSample; NVML itself is exercised by the gpu-marked test).
    state.gpu_samples = [GpuSample(index=0, uuid="GPU-0", name="NVIDIA H100", utilization_ratio=0.5,
                                   framebuffer_used_bytes=10, framebuffer_free_bytes=90, framebuffer_total_bytes=100,
                                   temperature_celsius=40.0, power_watts=100.0, ecc_corrected_total=0,
                                   processes=[GpuProcess(123, 10)])]
    await apoll(lambda: state.host_sample is not None)
    await apoll(lambda: state.evaluator.ticks > 3)

    text = await _scrape(http, server)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    latency = {(s.labels["window"], s.labels["quantile"]): s.value for s in families["muai_sidecar_latency_seconds"].samples
               if s.labels["model"] == "llama" and "quantile" in s.labels}
    assert latency[("1m", "0.99")] == pytest.approx(0.496)
    assert latency[("10s", "0.5")] == pytest.approx(0.3)
    for name in (
        "muai_sidecar_throughput_requests_per_second", "muai_sidecar_error_ratio", "muai_sidecar_time_to_first_token_seconds",
        "muai_sidecar_inference_latency_seconds", "muai_sidecar_output_tokens_per_second", "muai_sidecar_requests",
        "muai_gpu_utilization_ratio", "muai_gpu_framebuffer_used_bytes", "muai_gpu_framebuffer_free_bytes",
        "muai_gpu_temperature_celsius", "muai_gpu_power_watts", "muai_gpu_xid_errors", "muai_gpu_process_memory_used_bytes",
        "muai_host_cpu_utilization_ratio", "muai_host_memory_used_bytes", "muai_sidecar_spans_received",
        "muai_sidecar_alerts_firing", "muai_sidecar_forward_dropped_batches", "muai_sidecar_gpu_available",
    ):
        assert name in families, name
    ratio = [s.value for s in families["muai_sidecar_error_ratio"].samples if s.labels["window"] == "1m"]
    assert ratio == [pytest.approx(0.2)]
    assert "muai_sidecar_requests_total" in text and "muai_gpu_xid_errors_total" in text
    # Cumulative since start, once per series and without a window label (not repeated per window, which
    # made sum(rate(..._count)) count every request once per window).
    for family in ("muai_sidecar_latency_seconds", "muai_sidecar_inference_latency_seconds",
                   "muai_sidecar_time_to_first_token_seconds"):
        totals = [(s.name, s.labels) for s in families[family].samples
                  if s.name.endswith(("_count", "_sum")) and s.labels["model"] == "llama"]
        assert totals == [(family + "_count", {"model": "llama", "operation": "chat"}),
                          (family + "_sum", {"model": "llama", "operation": "chat"})], family
    counts = [s.value for s in families["muai_sidecar_latency_seconds"].samples
              if s.name.endswith("_count") and s.labels["model"] == "llama"]
    assert counts == [5]
    (latency_sum,) = [s.value for s in families["muai_sidecar_latency_seconds"].samples
                      if s.name.endswith("_sum") and s.labels["model"] == "llama"]
    assert latency_sum == pytest.approx(1.5)
    assert {s.labels["window"] for s in families["muai_sidecar_latency_seconds"].samples if "quantile" in s.labels} == {
        "10s", "1m", "5m"}

    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (Debian package prometheus, installed by scripts/bootstrap.sh)")
    result = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stdout + result.stderr


async def test_two_sidecars_in_one_process_share_no_registry(start_sidecar, http):
    a, _ = await start_sidecar()
    b, _ = await start_sidecar()
    f = SpanFactory()
    f.request(0.1, model="only-a")
    async with http.post(a.make_url("/v1/traces"), data=encode(f.take()), headers=PB) as resp:
        assert resp.status == 200
    assert "only-a" in await _scrape(http, a)
    assert "only-a" not in await _scrape(http, b)


def _window_requests(text: str, model: str, window: str = "1m") -> float | None:
    for family in text_string_to_metric_families(text):
        if family.name == "muai_sidecar_window_requests":
            for s in family.samples:
                if s.labels["model"] == model and s.labels["window"] == window:
                    return s.value
    return None


async def test_window_statistics_are_computed_at_most_once_per_second_of_scrapes(start_sidecar, http):
    """Scrapes run on the loop that ingests spans: within SERIES_CACHE_S they share one computation of the
    series x windows statistics (live counters stay live)."""
    from sidecar.metrics import SERIES_CACHE_S
    from support.clock import ManualClock

    clock = ManualClock()
    server, _ = await start_sidecar(quiet_config(), clock=clock, wall_clock=clock.wall)

    async def post(n: int) -> None:
        f = SpanFactory()
        for _ in range(n):
            f.request(0.1, model="cached")
        async with http.post(server.make_url("/v1/traces"), data=encode(f.take()), headers=PB) as resp:
            assert resp.status == 200

    await post(3)
    assert _window_requests(await _scrape(http, server), "cached") == 3
    await post(2)
    text = await _scrape(http, server)
    assert _window_requests(text, "cached") == 3  # the same second: the cached statistics
    assert "muai_sidecar_spans_received_total 5.0" in text
    clock.advance(SERIES_CACHE_S)
    assert _window_requests(await _scrape(http, server), "cached") == 5
