"""The orchestrator process: model manager, workflows, dynamic batcher, HTTP server and in-process telemetry.

Names load on first use, so importing a submodule (``orchestrator.config`` for ``muai config check``) does not
pull in the server, OpenTelemetry and the manager.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "Batcher": "orchestrator.batcher",
    "BatchingPolicy": "orchestrator.batching",
    "BatcherClosedError": "orchestrator.errors",
    "ModelLoadFailedError": "orchestrator.errors",
    "ModelNotReadyError": "orchestrator.errors",
    "MuaiError": "orchestrator.errors",
    "UnknownModelError": "orchestrator.errors",
    "UnknownWorkflowError": "orchestrator.errors",
    "WorkflowValidationError": "orchestrator.errors",
    "ManagedModel": "orchestrator.manager",
    "ModelEvent": "orchestrator.manager",
    "ModelManager": "orchestrator.manager",
    "EngineAvailability": "orchestrator.model_status",
    "ManagerStatus": "orchestrator.model_status",
    "ModelStatus": "orchestrator.model_status",
    "create_app": "orchestrator.server",
    "serve": "orchestrator.server",
    "Workflow": "orchestrator.workflows",
    "WorkflowResult": "orchestrator.workflows",
    "default_workflows": "orchestrator.workflows",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'orchestrator' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))
