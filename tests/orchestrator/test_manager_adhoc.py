"""Ad-hoc chains (``infer(engine_preference=...)``) load like models (defect (b) of issue 12): within the resident
budget, and not under the registry's lock that every register and unload takes."""

from __future__ import annotations

import threading

import pytest

from adapters.echo import EchoEngine
from muai.config import MuaiConfig
from orchestrator.errors import ModelLoadFailedError
from orchestrator.manager import ModelManager

pytestmark = pytest.mark.timeout(60)
WEIGHTS = 4096


def any_engine_is_echo(name, settings):
    """Every preference entry served by an echo engine: the ad-hoc chain is a second, separately loaded chain
    whatever its engine's name, which is all these tests need."""
    return EchoEngine(settings)


def model_dir(tmp_path, name):
    root = tmp_path / name
    root.mkdir()
    (root / "model.safetensors").write_bytes(b"\0" * WEIGHTS)  # what the resident budget measures
    return str(root)


def budget_config(tmp_path, budget):
    return MuaiConfig(
        models=[{"name": "a", "path": model_dir(tmp_path, "a"), "engine": "echo", "preload": False, "required": False},
                {"name": "b", "path": model_dir(tmp_path, "b"), "engine": "echo"}],
        engines={"preference": ["echo"], "resident_budget_bytes": budget},
    )


def test_an_ad_hoc_chain_counts_against_the_resident_budget(tmp_path):
    m = ModelManager(budget_config(tmp_path, int(WEIGHTS * 2.5)), engine_factory=any_engine_is_echo)
    m.load_model("a")
    m.load_model("b")
    assert m.infer("b", "one two", max_new_tokens=1, engine_preference=["torch"]) == "two"
    # b's second chain needed b's weights again: a, the evictable one, made room.
    assert not m.is_loaded("a") and m.status().as_dict()["models"]["a"]["evicted"] is True
    assert m.is_loaded("b")
    # Nothing evictable is left: a third copy of b does not fit and says why.
    with pytest.raises(ModelLoadFailedError, match="resident_budget_bytes"):
        m.infer("b", "one two", max_new_tokens=1, engine_preference=["onnxruntime"])
    # The chain already loaded is reused without asking for room again.
    assert m.infer("b", "three four", max_new_tokens=1, engine_preference=["torch"]) == "four"
    m.close()


class GatedEcho(EchoEngine):
    """An echo engine whose load waits for the test to open the gate."""

    entered = threading.Event()
    gate = threading.Event()

    def load(self, spec):
        GatedEcho.entered.set()
        if not GatedEcho.gate.wait(timeout=30):
            raise RuntimeError("the test never opened the gate")
        super().load(spec)


def test_an_ad_hoc_load_does_not_hold_the_registry_lock(tmp_path):
    GatedEcho.entered.clear()
    GatedEcho.gate.clear()
    cfg = MuaiConfig(models=[{"name": "b", "path": model_dir(tmp_path, "b"), "engine": "echo"}],
                     engines={"preference": ["echo"]})
    m = ModelManager(cfg, engine_factory=lambda name, s: GatedEcho(s) if name == "torch" else EchoEngine(s))
    m.load_model("b")
    results: list[str] = []
    slow = threading.Thread(target=lambda: results.append(
        m.infer("b", "one two", max_new_tokens=1, engine_preference=["torch"])))
    slow.start()
    try:
        assert GatedEcho.entered.wait(timeout=30)
        registered = threading.Event()
        other = threading.Thread(target=lambda: (m.register_model({"name": "c", "path": "/x", "engine": "echo"}),
                                                 registered.set()))
        other.start()
        # While b's ad-hoc chain loads, the registry goes on: registering another model does not wait for it.
        assert registered.wait(timeout=10), "register_model waited for an ad-hoc chain's load"
        other.join()
    finally:
        GatedEcho.gate.set()
        slow.join(timeout=30)
    assert results == ["two"] and "c" in m.models()
    m.close()
