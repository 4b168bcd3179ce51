"""The orchestrator process: model manager, workflows, dynamic batcher, HTTP server and in-process telemetry."""

from orchestrator.batcher import Batcher
from orchestrator.batching import BatchingPolicy
from orchestrator.errors import (
    BatcherClosedError,
    ModelLoadFailedError,
    ModelNotReadyError,
    MuaiError,
    UnknownModelError,
    UnknownWorkflowError,
    WorkflowValidationError,
)
from orchestrator.manager import ManagedModel, ModelEvent, ModelManager
from orchestrator.server import create_app, serve
from orchestrator.workflows import Workflow, WorkflowResult, default_workflows

__all__ = [
    "Batcher",
    "BatcherClosedError",
    "BatchingPolicy",
    "ManagedModel",
    "ModelEvent",
    "ModelLoadFailedError",
    "ModelManager",
    "ModelNotReadyError",
    "MuaiError",
    "UnknownModelError",
    "UnknownWorkflowError",
    "Workflow",
    "WorkflowResult",
    "WorkflowValidationError",
    "create_app",
    "default_workflows",
    "serve",
]
