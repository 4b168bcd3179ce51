"""On a machine with NVIDIA GPUs (``scripts/gpu-check.sh``; skipped elsewhere, saying why): the orchestrator's
inventory is NVML's, the planner's replicas sit on the real devices it names (the torch engine's weights are on
that GPU), and a real CUDA error, raised in a process of its own because it poisons that process's CUDA
context, is told to be a device fault and cordons the device."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300)]


def _nvml_devices() -> list[tuple[str, int]]:
    import pynvml

    pynvml.nvmlInit()
    try:
        return [(f"cuda:{i}", int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).total))
                for i in range(pynvml.nvmlDeviceGetCount())]
    finally:
        pynvml.nvmlShutdown()


def test_the_inventory_is_nvmls():
    from orchestrator.devices import discover

    found = discover()
    assert [(d.id, d.total_bytes) for d in found] == _nvml_devices()
    assert all(d.kind == "cuda" and 0 < d.free_bytes <= d.total_bytes for d in found)


def test_replicas_are_placed_on_the_real_gpus_and_their_weights_are_there(tmp_path):
    import torch
    from test_server_support import echo_config

    from adapters.base import GenerationRequest, SamplingParams
    from adapters.tiny import build_tiny_model
    from orchestrator.devices import DeviceBook, discover
    from orchestrator.manager import ModelManager

    path = build_tiny_model("tiny-llama", tmp_path / "tiny-llama")
    gpus = discover()
    replicas = min(2, len(gpus))
    config = echo_config(tmp_path, models=[{"name": "tiny", "path": str(path), "engine": "torch",
                                            "replicas": replicas, "preload": False}])
    manager = ModelManager(config)
    manager.devices = DeviceBook(gpus, reprobe_after_s=60)
    try:
        manager.load_model("tiny")
        placed = manager.placements()["tiny"]
        assert len(placed) == replicas and len(set(placed)) == replicas  # apart, one GPU each
        for device in placed:
            assert torch.cuda.memory_allocated(torch.device(device)) > 0, f"nothing of the model on {device}"
        out = manager.run_sync(manager.generate("tiny", GenerationRequest("Hello world",
                                                                          SamplingParams(max_new_tokens=4))))
        assert out.completion_tokens == 4
    finally:
        manager.close()


_ASSERT = """
import torch
x = torch.zeros(4, device="cuda")
try:
    x[torch.tensor([40], device="cuda")] = 1.0
    torch.cuda.synchronize()
except RuntimeError as exc:
    print(str(exc))
"""


def test_a_real_cuda_error_is_a_device_fault_and_cordons_the_device():
    from adapters._hf import device_fault
    from orchestrator.devices import DeviceBook, discover

    run = subprocess.run([sys.executable, "-c", _ASSERT], capture_output=True, text=True, timeout=120)
    message = run.stdout.strip()
    assert "CUDA error" in message, (run.stdout, run.stderr)
    reason = device_fault(RuntimeError(message))
    assert reason is not None, message
    book = DeviceBook(discover(), reprobe_after_s=60)
    state = book.fault("cuda:0", reason, now=0.0)
    assert state is not None and state.cordoned == "fault"
    assert [d.cordoned is not None for d in book.for_placement(1.0)][0]
