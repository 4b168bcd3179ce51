"""GPU (NVML) and host (psutil) collectors, and how the sidecar reports them."""

from __future__ import annotations

import logging
import os

import psutil
import pytest

from sidecar.collectors.gpu import GpuCollector
from sidecar.collectors.host import HostCollector
from sidecar_helpers import quiet_config
from support.waiting import apoll


def _nvml_works() -> bool:
    c = GpuCollector()
    try:
        return c.start()
    finally:
        c.close()


async def test_without_a_gpu_the_sidecar_runs_and_says_so(start_sidecar, http, caplog):
    if _nvml_works():
        pytest.skip("a GPU is present here; the no-GPU path needs a machine without one")
    caplog.clear()  # the probe above logged its own "no GPU"
    caplog.set_level(logging.WARNING, logger="sidecar.collectors.gpu")
    server, state = await start_sidecar(quiet_config(collectors={"interval_s": 0.01}))
    await apoll(lambda: state.host_sample is not None)
    await apoll(lambda: state.monitor.resource_stats("host_cpu_percent", "", state.clock()).get("1m", {}).get("samples", 0) >= 3)
    async with http.get(server.make_url("/api/v1/gpus")) as resp:
        body = await resp.json()
    assert resp.status == 200
    assert body["available"] is False and body["gpus"] == [] and "NVML" in body["reason"]
    async with http.get(server.make_url("/health")) as resp:
        health = await resp.json()
    assert health["status"] == "ok" and health["gpu"]["available"] is False
    no_gpu_lines = [r for r in caplog.records if "no GPU" in r.getMessage()]
    assert len(no_gpu_lines) == 1  # said once, not once per sample
    assert GpuCollector().sample() == []


@pytest.mark.gpu
def test_nvml_reads_every_gpu():
    collector = GpuCollector()
    assert collector.start(), collector.reason
    try:
        samples = collector.sample()
        assert len(samples) == collector.count >= 1
        for s in samples:
            assert s.uuid and s.name
            assert s.framebuffer_total_bytes and s.framebuffer_total_bytes > 0
            assert s.framebuffer_used_bytes is not None and s.framebuffer_free_bytes is not None
            assert 0 <= (s.utilization_ratio or 0) <= 1
            assert s.temperature_celsius is None or 0 < s.temperature_celsius < 130
            assert s.xid_errors_total >= 0
            assert isinstance(s.as_dict()["processes"], list)
        assert collector.sample()[0].uuid == samples[0].uuid  # handles reused; NVML initialised once
    finally:
        collector.close()
    assert collector.sample() == []


@pytest.mark.gpu
async def test_gpu_series_reach_the_api_and_metrics(start_sidecar, http):
    server, state = await start_sidecar(quiet_config(collectors={"interval_s": 0.05}))
    await apoll(lambda: state.gpu_samples)
    async with http.get(server.make_url("/api/v1/gpus")) as resp:
        body = await resp.json()
    assert body["available"] is True and body["count"] >= 1
    async with http.get(server.make_url("/metrics")) as resp:
        text = await resp.text()
    assert "muai_gpu_framebuffer_total_bytes{" in text and "muai_sidecar_gpu_available 1.0" in text


def test_host_collector_finds_the_orchestrator_by_pid_file(tmp_path):
    pid_file = tmp_path / "muai.pid"
    pid_file.write_text(f"{os.getpid()}\n")
    collector = HostCollector(pid_file=str(pid_file))
    first = collector.sample()
    sample = collector.sample()
    assert 0 <= first.cpu_percent <= 100 and 0 < sample.memory_percent < 100
    assert sample.memory_total_bytes == psutil.virtual_memory().total
    assert sample.orchestrator is not None
    assert (sample.orchestrator.pid, sample.orchestrator.found_by) == (os.getpid(), "pid_file")
    assert sample.orchestrator.rss_bytes > 0
    pid_file.write_text("not a pid")
    assert collector.sample().orchestrator is None  # the file no longer names this process


async def test_host_collector_finds_the_orchestrator_by_listen_port(start_sidecar):
    # Our own test server stands in for the orchestrator: it is a process listening on a known port.
    server, _ = await start_sidecar()
    sample = HostCollector(port=server.port).sample()
    assert sample.orchestrator is not None
    assert (sample.orchestrator.pid, sample.orchestrator.found_by) == (os.getpid(), "port")
    assert HostCollector(port=1).sample().orchestrator is None


async def test_host_api(start_sidecar, http, tmp_path):
    pid_file = tmp_path / "muai.pid"
    pid_file.write_text(str(os.getpid()))
    server, state = await start_sidecar(
        quiet_config(collectors={"interval_s": 0.01, "orchestrator": {"pid_file": str(pid_file)}})
    )
    await apoll(lambda: state.monitor.resource_stats("orchestrator_rss_bytes", "", state.clock()).get("1m", {}).get("samples", 0) >= 2)
    async with http.get(server.make_url("/api/v1/host")) as resp:
        body = await resp.json()
    assert body["host"]["orchestrator"]["pid"] == os.getpid()
    assert body["windows"]["memory_percent"]["1m"]["samples"] >= 2
    assert body["windows"]["orchestrator_rss_bytes"]["5m"]["max"] > 0
    async with http.get(server.make_url("/metrics")) as resp:
        text = await resp.text()
    assert "muai_orchestrator_process_up 1.0" in text and "muai_orchestrator_process_resident_memory_bytes" in text
