"""Readiness as a pure function: required models, preload, degradation, draining and a stuck engine."""

from __future__ import annotations

from orchestrator.admission import AdmissionSnapshot
from orchestrator.health import (
    DEGRADED,
    DRAINING,
    READY,
    UNAVAILABLE,
    HealthState,
    ModelRequirement,
    evaluate_readiness,
)
from orchestrator.model_status import EngineAvailability, ManagerStatus, ModelStatus

IDLE = AdmissionSnapshot(capacity=8, waiting=0, running=0, draining=False, stalled_s=0.0)


def status(**models):
    return {
        "models": {name: {"state": state, "engine": "torch" if state == "ready" else None, "degraded_reasons": []}
                   for name, state in models.items()},
        "engines": {"torch": {"available": True, "reason": None}, "vllm": {"available": False, "reason": "not installed"}},
    }


def typed(doc) -> ManagerStatus:
    """The tests' dicts (easy to edit per case) as the manager's typed snapshot."""
    return ManagerStatus(
        {name: ModelStatus(state=e["state"], task="generate", engine=e.get("engine"),
                           degraded_reasons=tuple(e.get("degraded_reasons", ())), error=e.get("error"))
         for name, e in doc["models"].items()},
        {name: EngineAvailability(**e) for name, e in doc["engines"].items()},
    )


def evaluate(manager_status, *, models=(ModelRequirement("a"),), admission=IDLE, pending=(), problems=(), stuck_after_s=60):
    return evaluate_readiness(models=models, manager_status=typed(manager_status), admission=admission,
                              stuck_after_s=stuck_after_s, preload_pending=pending, problems=problems)


def test_ready_when_required_models_are_ready():
    result = evaluate(status(a="ready"))
    assert result.ready and result.http_status == 200 and result.status == READY
    assert result.body["models"]["a"] == {"engine": "torch", "state": "ready", "required": True, "preload": True,
                                          "degraded": []}
    assert result.body["engines"]["vllm"] == {"available": False, "reason": "not installed"}


def test_preload_pending_is_not_ready():
    result = evaluate(status(a="loading"), pending={"a"})
    assert not result.ready and result.http_status == 503
    assert "still loading" in result.body["reasons"][0]


def test_failed_required_model_is_not_ready_but_optional_is_fine():
    failed = status(a="ready", b="failed")
    failed["models"]["b"]["error"] = "no engine could load it"
    result = evaluate(failed, models=(ModelRequirement("a"), ModelRequirement("b", required=False)))
    assert result.ready
    result = evaluate(failed, models=(ModelRequirement("a"), ModelRequirement("b")))
    assert not result.ready and result.status == UNAVAILABLE
    assert "no engine could load it" in result.body["reasons"][0]


def test_required_model_without_preload_is_servable_unless_failed():
    models = (ModelRequirement("a", preload=False),)
    assert evaluate(status(a="unloaded"), models=models).ready
    assert not evaluate(status(a="failed"), models=models).ready


def test_a_required_model_no_engine_serves_is_not_ready_preloaded_or_not():
    st = status(a="unavailable")
    st["models"]["a"]["degraded_reasons"] = ["no engine can serve model 'a'"]
    for models in ((ModelRequirement("a"),), (ModelRequirement("a", preload=False),)):
        result = evaluate(st, models=models)
        assert not result.ready and result.status == UNAVAILABLE
        assert result.body["reasons"] == ["required model a is unavailable: no engine serves it "
                                          "(no engine can serve model 'a')"]
    assert evaluate(st, models=(ModelRequirement("a", required=False),)).ready


def test_degraded_is_ready_and_says_why():
    st = status(a="ready")
    st["models"]["a"]["degraded_reasons"] = ["vllm failed: injected"]
    result = evaluate(st, problems=["trace export to http://x failing"])
    assert result.ready and result.status == DEGRADED
    assert result.body["degraded"] == ["model a: vllm failed: injected", "trace export to http://x failing"]


def test_draining_is_503():
    drained = AdmissionSnapshot(capacity=8, waiting=0, running=1, draining=True, stalled_s=0.0)
    result = evaluate(status(a="ready"), admission=drained)
    assert not result.ready and result.status == DRAINING
    assert result.body["reasons"][0].startswith("draining")


def test_stuck_engine_turns_readiness_503():
    busy = AdmissionSnapshot(capacity=8, waiting=2, running=1, draining=False, stalled_s=61.0)
    result = evaluate(status(a="ready"), admission=busy, stuck_after_s=60)
    assert not result.ready
    assert result.body["reasons"][0].startswith("stuck: 3 requests in flight")
    slow_but_alive = AdmissionSnapshot(capacity=8, waiting=2, running=1, draining=False, stalled_s=59.0)
    assert evaluate(status(a="ready"), admission=slow_but_alive, stuck_after_s=60).ready


def test_health_state_reports_and_clears():
    health = HealthState()
    health.report("traces", "export failing")
    health.report("metrics_port", "cannot bind")
    assert health.problems() == ["cannot bind", "export failing"]
    health.report("traces", None)
    assert health.problems() == ["cannot bind"]
