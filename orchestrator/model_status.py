"""The typed status contract from the model manager up to readiness: what a model's state is, which engine serves
it and why it is degraded, and whether each engine can run here.

:class:`ManagerStatus` is what ``ModelManager.snapshot()`` reads (a read of state: nothing is probed, imported or
expired) and what ``orchestrator.health.evaluate_readiness`` decides on; ``as_dict()`` gives the JSON shapes the
admin API and ``ModelManager.status()`` have always answered. The chain's own per-engine detail (``chain``) stays the
adapters' plain mapping: it is passed through for operators, never parsed here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

UNAVAILABLE = "unavailable"


@dataclass(frozen=True, slots=True)
class EngineAvailability:
    """Whether an engine can run here, and why not."""

    available: bool
    reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"available": self.available, "reason": self.reason}


@dataclass(frozen=True, slots=True)
class BatchingStatus:
    """A model's dynamic batcher: its current limits and counters."""

    batch_size: int
    batch_timeout_s: float
    pending: int
    in_flight: int
    batches: int
    requests: int

    def as_dict(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "batch_timeout_s": self.batch_timeout_s, "pending": self.pending,
                "in_flight": self.in_flight, "batches": self.batches, "requests": self.requests}


@dataclass(frozen=True, slots=True)
class ModelStatus:
    """One registered model. ``state`` is the lifecycle state, or ``unavailable``: loaded, but no engine of its
    fallback chain serves it now."""

    state: str
    task: str
    engine: str | None = None
    degraded_reasons: tuple[str, ...] = ()
    error: str | None = None
    required: bool = True
    preload: bool = True
    load_duration_s: float | None = None
    weights_bytes: int = 0
    evicted: bool = False
    batching: BatchingStatus | None = None
    chain: Mapping[str, Any] | None = None
    """The fallback chain's own status (adapters' shape); only in a full ``ModelManager.status()``."""

    @property
    def servable(self) -> bool:
        return self.state == "ready"

    @property
    def degraded(self) -> bool:
        return bool(self.degraded_reasons)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "state": self.state,
            "servable": self.servable,
            "task": self.task,
            "engine": self.engine,
            "degraded_reasons": list(self.degraded_reasons),
            "degraded": self.degraded,
            "error": self.error,
            "required": self.required,
            "preload": self.preload,
            "load_duration_s": self.load_duration_s,
            "weights_bytes": self.weights_bytes,
            "evicted": self.evicted,
        }
        if self.chain is not None:
            out["chain"] = dict(self.chain)
        if self.batching is not None:
            out["batching"] = self.batching.as_dict()
        return out


@dataclass(frozen=True, slots=True)
class ManagerStatus:
    """Every registered model's status and every engine's availability, at one instant."""

    models: Mapping[str, ModelStatus] = field(default_factory=dict)
    engines: Mapping[str, EngineAvailability] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"models": {name: m.as_dict() for name, m in self.models.items()},
                "engines": {name: e.as_dict() for name, e in self.engines.items()}}


__all__ = ["UNAVAILABLE", "BatchingStatus", "EngineAvailability", "ManagerStatus", "ModelStatus"]
