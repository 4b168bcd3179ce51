"""The typed status contract from the model manager up to readiness: what a model's state is, which engine serves
it and why it is degraded, and whether each engine can run here.

:class:`ManagerStatus` is what ``ModelManager.snapshot()`` reads (a read of state: nothing is probed, imported or
expired) and what ``orchestrator.health.evaluate_readiness`` decides on; ``as_dict()`` gives the JSON shapes the
admin API and ``ModelManager.status()`` have always answered. The chain's own per-engine detail (``chain``) is the
adapters' typed ``ChainStatus``; only the active engine's own facts inside it (``engine_status``) stay a mapping,
since they differ per engine by design and are passed through for operators, never parsed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from adapters.fallback import ChainStatus

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
    chain: ChainStatus | None = None
    """The fallback chain's own status; only in a full ``ModelManager.status()``."""
    chain_error: str | None = None
    """Why a full sample could not read the chain's status (the active engine's ``status()`` raised)."""

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
            out["chain"] = self.chain.as_dict()
        elif self.chain_error is not None:
            out["chain"] = {"error": self.chain_error}
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


def model_status_of(m: Any, chain_status: ChainStatus | None = None, chain_error: str | None = None) -> ModelStatus:
    """The status of a ``ManagedModel`` from its attributes, or with ``chain_status`` (the chain's own, asked for
    by a full sample) its degraded reasons from there. Reads only: nothing is asked of an engine."""
    chain = m.chain  # read once: an unload on a worker thread may clear it meanwhile
    state = m.state
    if state == "ready" and (chain is None or not chain.loaded):
        # Loaded once, but every engine of its chain has failed since: requests get 503 until an engine comes
        # back (the chain re-probes), so readiness must not call it ready.
        state = UNAVAILABLE
    if chain_status is not None:
        reasons = chain_status.degraded_reasons
    else:
        reasons = tuple(chain.degraded_reasons) if chain is not None else ()
    batching = None
    b = m.batcher
    if b is not None:
        st = b.stats()
        batching = BatchingStatus(st.policy.batch_size, st.policy.batch_timeout_s, st.policy.pending,
                                  st.in_flight, st.policy.batches, st.policy.dispatched)
    return ModelStatus(
        state=state, task=m.task, engine=chain.engine_name if chain is not None else None,
        degraded_reasons=reasons, error=m.error, required=m.config.required, preload=m.config.preload,
        load_duration_s=m.load_duration_s, weights_bytes=m.weights_bytes, evicted=m.evicted,
        batching=batching, chain=chain_status, chain_error=chain_error,
    )


def chain_availability(chain_statuses: Iterable[ChainStatus]) -> dict[str, EngineAvailability]:
    """Per engine, what the first chain that probed it found."""
    out: dict[str, EngineAvailability] = {}
    for chain_status in chain_statuses:
        for name, st in chain_status.engines.items():
            if name not in out and st.available is not None:
                out[name] = EngineAvailability(st.available, st.reason or None)
    return out


class ProbeCache:
    """Registry probes of engines no chain holds, each kept ``ttl_s``: a probe may import an engine library."""

    def __init__(self, ttl_s: float, clock: Callable[[], float]) -> None:
        self._ttl_s = ttl_s
        self._clock = clock
        self._probed: dict[str, tuple[float, EngineAvailability]] = {}

    def get(self, name: str, settings: Mapping[str, Any]) -> EngineAvailability:
        now = self._clock()
        probed = self._probed.get(name)
        if probed is None or now - probed[0] >= self._ttl_s:
            from adapters import registry

            av = registry.probe(name, settings)
            probed = self._probed[name] = (now, EngineAvailability(av.ok, av.reason or None))
        return probed[1]


__all__ = ["UNAVAILABLE", "BatchingStatus", "EngineAvailability", "ManagerStatus", "ModelStatus", "ProbeCache",
           "chain_availability", "model_status_of"]
