"""Readiness is a read of state (defect (i) of issue 12): a probe asks no engine for its status on the event loop
(an engine's status may expire KV-cache entries), probes no engine (a probe may import an engine library) and
rewrites nothing; the engines' status is sampled by the background loop on a worker thread."""

from __future__ import annotations

import asyncio
import threading

import pytest
from test_server_support import echo_config, poll, running_app

from adapters import registry
from adapters.echo import EchoEngine
from muai.config import MuaiConfig
from orchestrator.manager import ModelManager
from orchestrator.model_status import EngineAvailability, ManagerStatus

pytestmark = pytest.mark.timeout(120)


class StatusRecordingEngine(EchoEngine):
    """The echo engine, noting for every ``status()`` call whether it ran on an event loop's thread."""

    on_loop: list[str] = []
    calls: list[str] = []

    def status(self):
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            StatusRecordingEngine.calls.append(threading.current_thread().name)
        else:
            StatusRecordingEngine.on_loop.append(threading.current_thread().name)
            StatusRecordingEngine.calls.append("event loop")
        return super().status()


def recording_factory(name, settings):
    if name == "echo":
        return StatusRecordingEngine(settings)
    return registry.create_engine(name, settings)


@pytest.fixture(autouse=True)
def _fresh_records():
    StatusRecordingEngine.on_loop, StatusRecordingEngine.calls = [], []


async def test_readiness_asks_no_engine_for_its_status_on_the_event_loop(tmp_path):
    config = echo_config(tmp_path, models=[{"name": "echo", "path": str(tmp_path), "engine": "echo"}],
                         telemetry={"metrics": {"resource_interval_s": 0.05}})
    async with running_app(config, engine_factory=recording_factory) as (client, state):
        for _ in range(5):
            resp = await client.get("/health/ready")
            assert resp.status == 200
            body = await resp.json()
            assert body["models"]["echo"] == {"engine": "echo", "state": "ready", "required": True,
                                              "preload": True, "degraded": []}
        # The background loop does sample the engines' status, off the loop, and readiness shows what it found.
        await poll(lambda: StatusRecordingEngine.calls, what="a background status sample")
        body = await poll(lambda: _engines_shown(client), what="the sampled availability in readiness")
        assert body["engines"]["echo"] == {"available": True, "reason": None}
        assert StatusRecordingEngine.on_loop == []
        assert state.engine_of("echo") == "echo" and state.engine_of("nope") == "unknown"


async def _engines_shown(client):
    body = await (await client.get("/health/ready")).json()
    return body if "echo" in body["engines"] else None


def test_the_snapshot_probes_nothing_and_reports_the_last_sample():
    cfg = MuaiConfig(models=[{"name": "e", "path": "/nonexistent-is-fine-for-echo", "engine": "echo"}],
                     engines={"preference": ["echo"]})
    m = ModelManager(cfg, engine_factory=recording_factory)
    m.load_model("e")
    snap = m.snapshot()
    assert isinstance(snap, ManagerStatus) and snap.engines == {}
    assert snap.models["e"].state == "ready" and snap.models["e"].engine == "echo"
    assert snap.models["e"].chain is None and StatusRecordingEngine.calls == []
    full = m.status().as_dict()
    assert StatusRecordingEngine.calls and full["models"]["e"]["chain"]["engine_status"]["engine"] == "echo"
    assert m.snapshot().engines["echo"] == EngineAvailability(True, None)
    # The typed snapshot and the full status agree on everything the snapshot holds.
    typed = m.snapshot().as_dict()["models"]["e"]
    assert typed == {k: v for k, v in full["models"]["e"].items() if k != "chain"}
    m.close()
