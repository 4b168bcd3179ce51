"""Fatal GPU faults in the NVML samples: told apart from the application's own XIDs (pure watch), then, through a
real sidecar and a real orchestrator, a critical alert and the GPU cordoned in the orchestrator's device book. A
GPU NVML reports lost (pynvml's own ``NVMLError_GpuIsLost``, raised by a collector of ours) takes the same path,
once per loss."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pynvml
from aiohttp.test_utils import TestServer
from sidecar_helpers import RecordingSink, quiet_config
from support.waiting import apoll

from sidecar.app import _cordon
from sidecar.collectors.gpu import GpuCollector, GpuSample, is_gpu_lost
from sidecar.gpu_faults import ALERT_GPU_FAULT, GpuFaultWatch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "orchestrator"))
TOKEN = "sidecar-admin-token-0123456789"


def sample(index=0, *, xids=0, last=None, ecc=0) -> GpuSample:
    return GpuSample(index, f"GPU-{index}", "H200", xid_errors_total=xids, last_xid=last, ecc_uncorrected_total=ecc)


def test_fatal_xids_and_uncorrectable_ecc_are_faults_once_and_the_first_sample_is_a_baseline():
    watch = GpuFaultWatch()
    assert watch.update([sample(0, xids=3, last=79), sample(1, ecc=2)]) == []  # old history: not ours to act on
    assert watch.update([sample(0, xids=4, last=13), sample(1, ecc=2)]) == []  # XID 13: the application's fault
    faults = watch.update([sample(0, xids=5, last=79), sample(1, ecc=3)])
    assert [(f.device, f.reason) for f in faults] == [
        ("cuda:0", "XID 79 (GPU has fallen off the bus)"), ("cuda:1", "1 uncorrectable ECC error(s)")]
    assert watch.update([sample(0, xids=6, last=48), sample(1, ecc=9)]) == []  # once per GPU


async def test_a_fatal_xid_raises_the_alert_and_cordons_the_gpu_in_the_orchestrator(tmp_path, start_sidecar):
    from test_server_support import echo_config

    from orchestrator.devices import DeviceBook, DeviceState
    from orchestrator.server import create_app
    from orchestrator.state import STATE as SERVER_STATE

    app = create_app(echo_config(tmp_path, server={"admin_token": TOKEN}))
    orchestrator = TestServer(app, host="127.0.0.1", port=0)
    await orchestrator.start_server()
    try:
        # This machine has no GPU: the book is given one, as NVML would have listed it.
        book = app[SERVER_STATE].devices = DeviceBook([DeviceState("cuda:0", "cuda", 2**30, 2**30)], reprobe_after_s=60)
        _, state = await start_sidecar(quiet_config(
            tuner={"enabled": False, "admin_token": TOKEN},
            collectors={"orchestrator": {"url": str(orchestrator.make_url("")).rstrip("/")}}))
        state.gpu_samples = [sample(0, xids=1, last=13)]
        state.evaluate()
        state.gpu_samples = [sample(0, xids=2, last=79)]
        state.evaluate()
        firing = [a for a in state.book.to_json()["active"] if a["labels"]["alertname"] == ALERT_GPU_FAULT]
        assert len(firing) == 1 and firing[0]["labels"]["severity"] == "critical", state.book.to_json()
        assert [f.device for f in state.pending_cordons] == ["cuda:0"]
        await _cordon(state, state.pending_cordons.pop())
        device = book.get("cuda:0")
        assert device.cordoned == "operator" and device.reason == "sidecar: XID 79 (GPU has fallen off the bus)"
    finally:
        await orchestrator.close()


class ReadableGpus(GpuCollector):
    """Our collector over GPUs this machine does not have: each reads as a healthy H200 until the test loses it,
    after which reading it raises what NVML raises for a lost GPU (pynvml's own exception class)."""

    def __init__(self, count: int) -> None:
        super().__init__(processes=False)
        self._count = count
        self.lost: set[int] = set()
        self.reads = 0

    def start(self) -> bool:
        self._ready([(index, (f"GPU-{index}", "H200")) for index in range(self._count)])
        return True

    def read(self, index: int, handle) -> GpuSample:
        self.reads += 1
        if index in self.lost:
            raise pynvml.NVMLError_GpuIsLost()
        return GpuSample(index, f"GPU-{index}", "H200", utilization_ratio=0.5, framebuffer_used_bytes=2**20,
                         framebuffer_free_bytes=2**30 - 2**20, framebuffer_total_bytes=2**30, ecc_uncorrected_total=0)

    def close(self) -> None:
        self.available = False


def test_nvml_gpu_is_lost_is_told_apart_from_an_unreadable_field():
    assert is_gpu_lost(pynvml.NVMLError_GpuIsLost())
    assert is_gpu_lost(pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST))  # pynvml maps the code to its class
    assert is_gpu_lost(RuntimeError("nvmlDeviceGetMemoryInfo: GPU is lost"))
    assert is_gpu_lost(RuntimeError("NVML_ERROR_GPU_IS_LOST"))
    assert not is_gpu_lost(pynvml.NVMLError_NotSupported())
    assert not is_gpu_lost(pynvml.NVMLError(pynvml.NVML_ERROR_NO_PERMISSION))


def test_a_lost_gpu_reads_as_lost_and_the_others_as_usual():
    gpus = ReadableGpus(2)
    assert gpus.start()
    gpus.lost.add(1)
    healthy, lost = gpus.sample()
    assert healthy.lost is None and healthy.framebuffer_total_bytes == 2**30
    assert lost.lost == "NVMLError_GpuIsLost: GPU is lost" and lost.framebuffer_total_bytes is None
    assert lost.as_dict()["lost"] == lost.lost


def test_a_loss_is_a_fault_from_its_first_sample_once_per_loss():
    watch = GpuFaultWatch()
    lost = GpuSample(1, "GPU-1", "H200", lost="NVMLError_GpuIsLost: GPU is lost")
    (fault,) = watch.update([sample(0), lost])  # no baseline needed: the GPU is gone now, not in its history
    assert (fault.device, fault.reason) == ("cuda:1", "GPU is lost (NVMLError_GpuIsLost: GPU is lost)")
    assert watch.update([sample(0), lost]) == []  # every later scrape of the same loss: nothing new
    assert watch.update([sample(0), sample(1)]) == []  # read again (reset)
    assert [f.device for f in watch.update([sample(0), lost])] == ["cuda:1"]  # lost again: a new loss


async def test_a_lost_gpu_raises_the_alert_and_is_cordoned_once(tmp_path, start_sidecar, caplog):
    from test_server_support import echo_config

    from orchestrator.devices import DeviceBook, DeviceState
    from orchestrator.server import create_app
    from orchestrator.state import STATE as SERVER_STATE

    caplog.set_level(logging.WARNING, logger="orchestrator.devices")
    app = create_app(echo_config(tmp_path, server={"admin_token": TOKEN}))
    orchestrator = TestServer(app, host="127.0.0.1", port=0)
    await orchestrator.start_server()
    try:
        book = app[SERVER_STATE].devices = DeviceBook(
            [DeviceState(f"cuda:{i}", "cuda", 2**30, 2**30) for i in range(2)], reprobe_after_s=60)
        gpus, sink = ReadableGpus(2), RecordingSink()
        # The sidecar's own loops collect, evaluate and cordon here: nothing is called by hand.
        _, state = await start_sidecar(quiet_config(
            tuner={"enabled": False, "admin_token": TOKEN},
            collectors={"orchestrator": {"url": str(orchestrator.make_url("")).rstrip("/")}}),
            gpu_collector=gpus, extra_sinks=[sink])
        await apoll(lambda: len(state.gpu_samples) == 2 and state.evaluator.ticks > 2)
        assert book.get("cuda:1").cordoned is None

        gpus.lost.add(1)
        await apoll(lambda: book.get("cuda:1").cordoned, what="cuda:1 cordoned by the sidecar")
        device = book.get("cuda:1")
        assert device.cordoned == "operator"
        assert device.reason == "sidecar: GPU is lost (NVMLError_GpuIsLost: GPU is lost)"
        assert book.get("cuda:0").cordoned is None
        (firing,) = await apoll(lambda: sink.alerts("firing"))
        assert firing.labels["alertname"] == ALERT_GPU_FAULT and firing.labels["gpu"] == "1"
        assert firing.labels["severity"] == "critical"

        # Many more scrapes of the same loss: no second alert, no second cordon.
        reads, ticks = gpus.reads, state.evaluator.ticks
        await apoll(lambda: gpus.reads >= reads + 20 and state.evaluator.ticks >= ticks + 20)
        assert state.gpu_samples[1].lost and not state.pending_cordons
        assert len(sink.alerts("firing")) == 1
        cordons = [r for r in caplog.records if r.getMessage().startswith("device cuda:1 cordoned")]
        assert len(cordons) == 1, [r.getMessage() for r in cordons]
    finally:
        await orchestrator.close()
