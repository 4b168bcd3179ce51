"""Fatal GPU faults in the NVML samples: told apart from the application's own XIDs (pure watch), then, through a
real sidecar and a real orchestrator, a critical alert and the GPU cordoned in the orchestrator's device book."""

from __future__ import annotations

import sys
from pathlib import Path

from aiohttp.test_utils import TestServer
from sidecar_helpers import quiet_config

from sidecar.app import _cordon
from sidecar.collectors.gpu import GpuSample
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
