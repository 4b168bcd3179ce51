"""The device book (pure, a clock the test moves) and the fault path through a real server: a CUDA-style fatal
error raised inside the torch engine's forward pass moves the model to the next engine, answers the request there,
cordons the device, and shows in readiness and the admin inventory until it is lifted."""

from __future__ import annotations

import pytest
from test_server_support import ADMIN_TOKEN, echo_config, running_app

from adapters._hf import device_fault
from orchestrator.devices import DeviceBook, DeviceState, UnknownDeviceError

pytestmark = pytest.mark.timeout(180)
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
ILLEGAL_ACCESS = "CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be reported later"


def book() -> DeviceBook:
    return DeviceBook([DeviceState("cuda:0", "cuda", 80, 70), DeviceState("cuda:1", "cuda", 80, 80)], reprobe_after_s=60)


def test_a_fault_cordons_until_its_reprobe_and_the_back_off_doubles():
    b = book()
    b.fault("cuda", "illegal memory access", now=0.0)  # torch's name for the current GPU
    assert b.get("cuda:0").cordoned == "fault" and b.problems(1.0) == [
        "device cuda:0 cordoned (fault): illegal memory access"]
    assert [d.cordoned for d in b.for_placement(1.0)] == [True, False]
    assert b.expire(59.9) == [] and b.expire(60.0) == ["cuda:0"] and b.get("cuda:0").cordoned is None
    b.fault("cuda:0", "again", now=100.0)
    assert b.get("cuda:0").reprobe_at == 220.0 and b.get("cuda:0").faults == 2
    assert b.devices(219.0)[0].cordoned == "fault" and b.devices(220.0)[0].cordoned is None


def test_an_operators_cordon_stays_and_a_fault_under_it_is_only_counted():
    b = book()
    b.cordon("cuda:1", "XID 79 (fallen off the bus)", now=5.0)
    b.fault("cuda:1", "lost", now=6.0)
    state = b.get("cuda:1")
    assert state.cordoned == "operator" and state.faults == 1 and state.reason.startswith("XID 79")
    assert b.expire(10_000.0) == [] and b.get("cuda:1").as_dict(15.0)["cordoned_for_s"] == 10.0
    assert b.uncordon("cuda:1", now=20.0).cordoned is None and b.problems(20.0) == []
    with pytest.raises(UnknownDeviceError, match="cuda:7.*cuda:0, cuda:1"):
        b.cordon("cuda:7", "", now=0.0)
    assert b.fault("cuda:7", "not listed", now=0.0) is None


@pytest.mark.parametrize("message,fault", [
    (ILLEGAL_ACCESS, True),
    ("CUDA error: device-side assert triggered", True),
    ("an uncorrectable ECC error was encountered", True),
    ("NVMLError_GpuIsLost: GPU is lost", True),
    ("CUDA out of memory. Tried to allocate 2.00 GiB", False),
    ("shape mismatch in matmul", False),
])
def test_device_faults_are_told_apart_from_other_failures(message, fault):
    assert (device_fault(RuntimeError(message)) is not None) == fault


async def test_a_fatal_device_error_moves_the_model_answers_the_request_and_cordons_the_device(tmp_path):
    config = echo_config(tmp_path, models=[{"name": "m", "path": "builtin:tiny-llama", "task": "generate"}],
                         engines={"preference": ["torch", "echo"]})
    async with running_app(config) as (client, state):
        device = state.devices.devices(0.0)[0].id
        chain = state.manager.get_model("m").chain
        assert chain.engine_name == "torch"

        def poisoned(module, args, output):
            raise RuntimeError(ILLEGAL_ACCESS)

        chain.active_engine.model.get_output_embeddings().register_forward_hook(poisoned)
        resp = await client.post("/v1/completions", json={"model": "m", "prompt": "hello", "max_tokens": 2})
        assert resp.status == 200, await resp.text()  # retried once, on the next engine
        assert chain.engine_name == "echo"

        ready = await (await client.get("/health/ready")).json()
        assert ready["status"] == "degraded"
        assert any(r.startswith(f"device {device} cordoned (fault)") and "illegal memory access" in r
                   for r in ready["degraded"]), ready
        listed = (await (await client.get("/admin/devices", headers=AUTH)).json())["devices"]
        entry = next(d for d in listed if d["id"] == device)
        assert entry["cordoned_by"] == "fault" and entry["faults"] == 1 and not entry["schedulable"]
        assert entry["reprobe_in_s"] > 0

        resp = await client.post(f"/admin/devices/{device}/uncordon", headers=AUTH)
        assert (await resp.json())["device"]["schedulable"] is True
        resp = await client.post(f"/admin/devices/{device}/cordon", headers=AUTH, json={"reason": "XID 48 (DBE)"})
        assert (await resp.json())["device"]["cordoned_by"] == "operator"
        ready = await (await client.get("/health/ready")).json()
        assert f"device {device} cordoned (operator): XID 48 (DBE)" in ready["degraded"]
        resp = await client.post(f"/admin/devices/{device}/cordon", headers=AUTH, json={"reasn": "typo"})
        assert resp.status == 422 and (await resp.json())["error"]["param"] == "reasn"
        resp = await client.post("/admin/devices/nope/cordon", headers=AUTH)
        assert resp.status == 404 and (await resp.json())["error"]["code"] == "device_not_found"
        assert (await client.get("/admin/devices")).status == 401


async def test_replicas_are_placed_apart_and_a_faulted_gpu_moves_its_models_to_the_others(tmp_path):
    """The planner over a book of two GPUs (as NVML would list them; the echo engines record the device their spec
    names and run anywhere): replicas apart, the smaller model on the emptier card; a device fault on cuda:0 moves
    every model placed there to cuda:1, and the request that met the fault is answered."""
    from adapters.echo import EchoFaults
    from test_server_support import poll

    faults = EchoFaults()
    (tmp_path / "echo-model").mkdir(exist_ok=True)
    config = echo_config(tmp_path, models=[
        {"name": "big", "path": str(tmp_path / "echo-model"), "engine": "echo", "replicas": 2, "preload": False},
        {"name": "small", "path": str(tmp_path / "echo-model"), "engine": "echo", "preload": False}])
    async with running_app(config, faults=faults) as (client, state):
        state.devices = state.manager.devices = DeviceBook(
            [DeviceState("cuda:0", "cuda", 2**34, 2**34), DeviceState("cuda:1", "cuda", 2**34, 2**34)],
            reprobe_after_s=60)
        for name in ("big", "small"):
            assert (await client.post(f"/admin/models/{name}/load", headers=AUTH)).status == 200
        placed = state.manager.placements()
        assert sorted(placed["big"]) == ["cuda:0", "cuda:1"] and len(placed["small"]) == 1
        listed = (await (await client.get("/admin/devices", headers=AUTH)).json())["devices"]
        assert {d["id"]: d["models"] for d in listed}["cuda:0"] in (["big"], ["big", "small"])

        faults.fault_devices.add("cuda:0")
        for _ in range(4):  # whichever replica the requests meet, each is answered
            resp = await client.post("/v1/completions", json={"model": "big", "prompt": "a b", "max_tokens": 1})
            assert resp.status in (200, 503), await resp.text()
            if resp.status == 503:
                assert "Retry-After" in resp.headers
        await poll(lambda: state.manager.placements().get("big") == ["cuda:1", "cuda:1"]
                   and state.manager.is_loaded("big"), what="big moved off cuda:0", timeout=30)
        assert all(d == "cuda:1" for devices in state.manager.placements().values() for d in devices)
        assert state.devices.get("cuda:0").cordoned == "fault"
        resp = await client.post("/v1/completions", json={"model": "big", "prompt": "a b", "max_tokens": 1})
        assert resp.status == 200, await resp.text()


def test_a_tensor_x_pipeline_replica_gets_its_planned_devices_and_moves_off_a_cordoned_one(tmp_path):
    """A model of tensor 2 x pipeline 1 ranks and two replicas over a book of six GPUs: each replica's engine is
    handed the two devices the planner gave it (``spec.device`` its first, ``spec.options["devices"]`` all, in rank
    order), the replicas hold no device in common, and a cordon moves only the replica on it. The engines here are
    echo engines that keep the spec they were loaded with: this machine has no GPU for vLLM to be pinned to (what
    vLLM does with the list is in tests/adapters/test_vllm_pinning.py)."""
    from adapters.echo import EchoEngine
    from orchestrator.manager import ModelManager

    loaded: list = []

    class SpecKeeper(EchoEngine):
        def load(self, spec):
            super().load(spec)
            loaded.append(spec)

    (tmp_path / "echo-model").mkdir(exist_ok=True)
    config = echo_config(tmp_path, models=[{"name": "tp", "path": str(tmp_path / "echo-model"), "engine": "vllm",
                                            "tensor_parallel_size": 2, "replicas": 2, "preload": False}])
    manager = ModelManager(config, engine_factory=lambda name, settings: SpecKeeper(settings))
    manager.devices = DeviceBook([DeviceState(f"cuda:{i}", "cuda", 2**34, 2**34) for i in range(6)],
                                 reprobe_after_s=60)
    try:
        manager.load_model("tp")
        groups = [tuple(spec.options["devices"]) for spec in loaded]
        assert len(groups) == 2 and all(len(g) == 2 for g in groups)
        assert [spec.device for spec in loaded] == [g[0] for g in groups]
        assert not set(groups[0]) & set(groups[1]), groups
        assert sorted(manager.placements()["tp"]) == sorted("+".join(g) for g in groups)

        lost = groups[0][1]
        manager.devices.cordon(lost, "XID 79", 0.0)
        loaded.clear()
        assert manager.move_off(lost) == ["tp"]
        after = [tuple(spec.options["devices"]) for spec in loaded]
        assert groups[1] in after, "the replica off the cordoned device moved"
        (moved,) = [g for g in after if g != groups[1]]
        assert lost not in moved and not set(moved) & set(groups[1])
    finally:
        manager.close()
