"""The orchestrator's errors: one root, ``MuaiError``, and leaves that also subclass the builtin they resemble.

The server maps them to HTTP: ``UnknownModelError`` -> 404, ``ModelNotReadyError`` -> 503 (with Retry-After),
``WorkflowValidationError`` -> 422, ``BatcherClosedError`` -> 503. Engine failures stay ``adapters.base.EngineError``
(their own family, raised from the engine layer with the cause kept).
"""

from __future__ import annotations

from collections.abc import Iterable


class MuaiError(Exception):
    """Root of the orchestrator's errors."""


class UnknownModelError(MuaiError, KeyError):
    """A request named a model that is not registered; the message lists the registered ones."""

    def __init__(self, name: str, registered: Iterable[str]) -> None:
        self.name = name
        self.registered = sorted(registered)
        listed = ", ".join(self.registered) if self.registered else "none"
        super().__init__(f"unknown model {name!r}; registered models: {listed}")

    def __str__(self) -> str:
        # KeyError's __str__ repr()s its argument; the message reads better plain.
        return str(self.args[0])


class ModelNotReadyError(MuaiError, RuntimeError):
    """The model is registered but not (yet, or no longer) loaded: loading, failed or unloaded."""

    def __init__(self, name: str, state: str, reason: str = "") -> None:
        self.name = name
        self.state = state
        self.reason = reason
        detail = f": {reason}" if reason else ""
        super().__init__(f"model {name!r} is not ready (state {state}){detail}")


class ModelLoadFailedError(MuaiError, RuntimeError):
    """Loading a model failed on every engine of its chain; the last engine error is the cause."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason
        super().__init__(f"model {name!r} failed to load: {reason}")


class WorkflowValidationError(MuaiError, ValueError):
    """A workflow's parameters are missing or malformed; the message names the parameter."""


class UnknownWorkflowError(MuaiError, KeyError):
    """A request named a workflow that does not exist; the message lists the known ones."""

    def __init__(self, name: str, known: Iterable[str]) -> None:
        self.name = name
        self.known = sorted(known)
        super().__init__(f"unknown workflow {name!r}; workflows: {', '.join(self.known) or 'none'}")

    def __str__(self) -> str:
        return str(self.args[0])


class BatchingConfigError(MuaiError, ValueError):
    """Batching limits that cannot work together (e.g. ``min_batch_size > max_batch_size``)."""


class BatcherClosedError(MuaiError, RuntimeError):
    """The batcher is closing or closed and takes no new requests."""


__all__ = [
    "BatcherClosedError",
    "BatchingConfigError",
    "ModelLoadFailedError",
    "ModelNotReadyError",
    "MuaiError",
    "UnknownModelError",
    "UnknownWorkflowError",
    "WorkflowValidationError",
]
