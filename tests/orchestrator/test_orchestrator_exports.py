import subprocess
import sys

import orchestrator


def test_public_surface_is_pinned():
    assert sorted(orchestrator.__all__) == sorted([
        "Batcher", "BatcherClosedError", "BatchingPolicy", "EngineAvailability", "ManagedModel", "ManagerStatus",
        "ModelStatus", "ModelEvent", "ModelLoadFailedError",
        "ModelManager", "ModelNotReadyError", "MuaiError", "UnknownModelError", "UnknownWorkflowError", "Workflow",
        "WorkflowResult", "WorkflowValidationError", "create_app", "default_workflows", "serve",
    ])
    for name in orchestrator.__all__:
        assert getattr(orchestrator, name) is not None


def test_importing_the_orchestrator_loads_no_engine():
    code = "import orchestrator, sys; bad = [m for m in ('torch', 'vllm', 'deepspeed', 'onnxruntime') if m in sys.modules]; assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
