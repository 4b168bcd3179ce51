"""Replicas (``models[].replicas``): separate engine instances on this machine's CPU, routed by outstanding
requests; a failing replica takes no new work; status shows every replica."""

from __future__ import annotations

import asyncio

import pytest

from adapters.base import GenerationRequest, SamplingParams
from adapters.echo import EchoEngine, EchoFaults
from muai.config import MuaiConfig
from orchestrator.manager import ModelManager

pytestmark = pytest.mark.timeout(120)


class CountingEcho(EchoEngine):
    """The echo engine counting every generate call it is handed, failed ones included; each loaded one joins
    ``loaded`` (a chain also builds engines only to probe them), and the n-th loaded takes ``faults_for[n]``."""

    def __init__(self, settings, loaded, faults_for):
        super().__init__(settings)
        self.attempts = 0
        self._loaded, self._faults_for = loaded, faults_for

    def load(self, spec):
        super().load(spec)
        faults = self._faults_for.get(len(self._loaded))
        if faults is not None:
            self.faults = faults
        self._loaded.append(self)

    async def generate(self, batch):
        self.attempts += 1
        return await super().generate(batch)


def config(replicas: int = 2, **model) -> MuaiConfig:
    return MuaiConfig(
        models=[{"name": "m", "path": "/nonexistent-is-fine-for-echo", "engine": "echo", "replicas": replicas,
                 **model}],
        engines={"preference": ["echo"], "torch": {"enabled": False}},
        batching={"enabled": False},
    )


def recording_factory(engines: list[CountingEcho], faults_for: dict[int, EchoFaults] | None = None):
    def factory(name, settings):
        if name != "echo":
            from adapters.registry import create_engine

            return create_engine(name, settings)
        return CountingEcho(settings, engines, faults_for or {})

    return factory


def req(prompt: str) -> GenerationRequest:
    return GenerationRequest(prompt, SamplingParams(max_new_tokens=2))


async def load(n: int, manager: ModelManager, concurrency: int = 8) -> None:
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with gate:
            result = await manager.generate("m", req(f"hello {i}"))
            assert result.text == f"hello {i}"

    await asyncio.gather(*(one(i) for i in range(n)))


async def test_two_replicas_share_a_concurrent_load_within_ten_percent():
    engines: list[CountingEcho] = []
    manager = ModelManager(config(inject_delay_s=0.002), engine_factory=recording_factory(engines))
    await manager.aload_model("m")
    assert len(engines) == 2
    await load(200, manager)
    calls = [e.calls for e in engines]
    assert sum(calls) == 200
    assert all(abs(c - 100) <= 10 for c in calls), calls
    replicas = manager.status().as_dict()["models"]["m"]["chain"]["replicas"]
    assert [r["served"] for r in replicas] == calls
    assert all(r["taking_work"] and r["engine"] == "echo" and r["outstanding"] == 0 for r in replicas)
    await manager.aclose()


async def test_requests_go_to_the_replica_with_fewest_outstanding():
    engines: list[CountingEcho] = []
    release = asyncio.Event()
    manager = ModelManager(config(), engine_factory=recording_factory(engines))
    await manager.aload_model("m")
    held = engines[0]

    async def held_generate(batch, _orig=held.generate):
        await release.wait()
        return await _orig(batch)

    held.generate = held_generate  # replica 0 holds every call it gets until released
    first = asyncio.create_task(manager.generate("m", req("a")))
    replicas = manager.get_model("m").chain.replicas
    deadline = asyncio.get_running_loop().time() + 5
    while replicas[0].outstanding + replicas[1].outstanding == 0:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.01)
    busy = 0 if replicas[0].outstanding else 1
    # While one replica holds a request, the other takes every new one.
    for i in range(5):
        await manager.generate("m", req(f"b{i}"))
    assert replicas[1 - busy].served == 5
    release.set()
    await first
    await manager.aclose()


async def test_a_failing_replica_takes_no_new_work_and_its_request_is_retried_elsewhere():
    engines: list[CountingEcho] = []
    faults = EchoFaults(fail_generate_always=True)
    manager = ModelManager(config(), engine_factory=recording_factory(engines, {1: faults}))
    await manager.aload_model("m")
    await load(40, manager, concurrency=1)  # every request answered, including the one replica 1 failed
    assert engines[1].attempts == 1
    assert engines[0].calls == 40
    status = manager.status().as_dict()["models"]["m"]
    assert status["state"] == "ready" and status["degraded"]
    assert any("replica 1" in reason and "takes no new work" in reason for reason in status["degraded_reasons"])
    line = status["chain"]["replicas"][1]
    assert line["taking_work"] is False and line["failures"] == 1 and "injected" in line["reason"]
    # Readiness reads the cheap snapshot: it shows the degradation too.
    assert manager.snapshot().models["m"].degraded
    await manager.aclose()


async def test_a_replica_comes_back_after_its_ejection():
    now = [0.0]
    engines: list[CountingEcho] = []
    faults = EchoFaults(fail_generate_times=1)
    cfg = config()
    manager = ModelManager(cfg, engine_factory=recording_factory(engines, {1: faults}), clock=lambda: now[0])
    await manager.aload_model("m")
    await load(4, manager, concurrency=1)
    before = engines[1].attempts
    await load(4, manager, concurrency=1)
    assert engines[1].attempts == before, "an ejected replica got work"
    now[0] += cfg.engines.reprobe_after_s + 1
    replica = manager.get_model("m").chain.replicas[1]
    served = replica.served
    await load(10, manager, concurrency=1)
    assert replica.served >= served + 4
    assert not manager.status().as_dict()["models"]["m"]["degraded"]
    await manager.aclose()


def test_replicas_must_be_at_least_one():
    with pytest.raises(ValueError, match="replicas"):
        config(replicas=0)


@pytest.fixture(scope="module")
def tiny_llama_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    pytest.importorskip("transformers")
    from adapters.tiny import resolve_model_path

    return resolve_model_path("builtin:tiny-llama", cache_dir=tmp_path_factory.getbasetemp() / "muai-cache" / "models")


async def test_two_tiny_torch_replicas_are_separate_engines_and_share_the_load(tiny_llama_path):
    cfg = MuaiConfig(
        models=[{"name": "m", "path": tiny_llama_path, "engine": "torch", "device": "cpu", "replicas": 2}],
        engines={"preference": ["torch"]},
        batching={"enabled": False},
    )
    manager = ModelManager(cfg)
    await manager.aload_model("m")
    chain = manager.get_model("m").chain
    first, second = (r.chain.active_engine for r in chain.replicas)
    assert first is not second
    gate = asyncio.Semaphore(4)

    async def one(i: int) -> str:
        async with gate:
            return (await manager.generate("m", GenerationRequest(f"a b {i}", SamplingParams(max_new_tokens=3)))).text

    texts = await asyncio.gather(*(one(i) for i in range(20)))
    assert len(texts) == 20
    served = [r.served for r in chain.replicas]
    # Both engines took real work. How evenly is timing here: fewest-outstanding sends more to the replica that
    # answers faster, and on two busy cores one torch engine can be the faster for a while (the evenness of the
    # routing itself is the echo test's above, where service times are equal by construction).
    assert sum(served) == 20 and min(served) >= 4, served
    await manager.aclose()
