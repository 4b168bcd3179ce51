"""Readiness that tells the truth (8.6, 15.6), as a pure function of what the server knows at one instant.

``/health/ready`` is 200 only when every *required* model can be served, the server is not draining and the engines
are making progress. It answers JSON either way, so an operator sees why:

- ``models``: per model, the engine serving it, its state (``loading``, ``ready``, ``failed``, ``unloaded``, or
  ``unavailable``: loaded, but every engine of its fallback chain has failed since), whether it is required, and its
  degraded reasons (fallbacks taken);
- ``engines``: per engine, whether it is available here and why not;
- ``degraded``: reasons the server serves in a reduced way (a fallback engine, a failing trace exporter, a metrics
  port that could not be bound, a collector that raised) -- degraded is still ready;
- ``reasons``: why it is not ready: a required model not servable (failed to load, or ``unavailable``), preload
  still running, draining, or a stuck engine: requests in flight and no token or result for
  ``server.stuck_after_s`` (vLLM does not check this).

Stuck means *no output at all*: only a streamed token or a finished result (an engine error included) counts as
progress; a request that times out (504), is cancelled or is refused does not, so an engine that wedges while
requests keep timing out does turn readiness 503. The flip side: a single non-streamed generation that runs longer
than ``server.stuck_after_s`` with nothing else finishing meanwhile also reads as stuck, because nothing comes out
until it ends. Set ``server.stuck_after_s`` above the longest non-streamed generation you expect (or stream).

A required model that is not preloaded counts as servable unless it failed or became unavailable. :class:`HealthState` collects the
problems telemetry components report from any thread.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from orchestrator.admission import AdmissionSnapshot
from orchestrator.model_status import UNAVAILABLE, ManagerStatus

READY = "ready"
DEGRADED = "degraded"
DRAINING = "draining"


class HealthState:
    """Problems reported by telemetry components (exporters, metrics port, collectors), keyed by component.

    ``report(key, None)`` clears the key. Thread safe: the span exporter reports from its worker thread.
    """

    def __init__(self) -> None:
        self._problems: dict[str, str] = {}
        self._lock = threading.Lock()

    def report(self, key: str, problem: str | None) -> None:
        with self._lock:
            if problem is None:
                self._problems.pop(key, None)
            else:
                self._problems[key] = problem

    def problems(self) -> list[str]:
        with self._lock:
            return [self._problems[k] for k in sorted(self._problems)]


@dataclass(frozen=True, slots=True)
class ModelRequirement:
    """What readiness needs to know of a configured model."""

    name: str
    required: bool = True
    preload: bool = True


@dataclass(frozen=True, slots=True)
class Readiness:
    ready: bool
    status: str
    body: dict[str, Any] = field(default_factory=dict)

    @property
    def http_status(self) -> int:
        return 200 if self.ready else 503


def evaluate_readiness(
    *,
    models: Iterable[ModelRequirement],
    manager_status: ManagerStatus,
    admission: AdmissionSnapshot,
    stuck_after_s: float,
    preload_pending: Iterable[str] = (),
    problems: Iterable[str] = (),
) -> Readiness:
    """Decide readiness from the manager's status snapshot, the admission counts and the telemetry problems. Pure."""
    reasons: list[str] = []
    degraded: list[str] = []
    pending = set(preload_pending)
    out_models: dict[str, dict[str, Any]] = {}
    for req in models:
        entry = manager_status.models.get(req.name)
        state = entry.state if entry is not None else ("loading" if req.name in pending else "unloaded")
        model_degraded = list(entry.degraded_reasons) if entry is not None else []
        out_models[req.name] = {
            "engine": entry.engine if entry is not None else None,
            "state": state,
            "required": req.required,
            "preload": req.preload,
            "degraded": model_degraded,
        }
        if entry is not None and entry.error:
            out_models[req.name]["error"] = entry.error
        degraded.extend(f"model {req.name}: {reason}" for reason in model_degraded)
        if not req.required:
            continue
        if req.name in pending and state != "ready":
            reasons.append(f"model {req.name} is still loading (preload)")
        elif state == "failed":
            detail = out_models[req.name].get("error")
            reasons.append(f"required model {req.name} failed to load" + (f": {detail}" if detail else ""))
        elif state == UNAVAILABLE:
            detail = "; ".join(model_degraded)
            reasons.append(f"required model {req.name} is unavailable: no engine serves it"
                           + (f" ({detail})" if detail else ""))
        elif req.preload and state != "ready":
            reasons.append(f"required model {req.name} is {state}")
    degraded.extend(problems)
    if admission.draining:
        reasons.insert(0, "draining: the server is shutting down")
    if admission.in_flight > 0 and admission.stalled_s > stuck_after_s:
        reasons.append(
            f"stuck: {admission.in_flight} requests in flight and no token or result for "
            f"{admission.stalled_s:.1f}s (server.stuck_after_s = {stuck_after_s:g})"
        )
    ready = not reasons
    if admission.draining:
        status = DRAINING
    elif not ready:
        status = UNAVAILABLE
    elif degraded:
        status = DEGRADED
    else:
        status = READY
    body = {
        "status": status,
        "ready": ready,
        "reasons": reasons,
        "degraded": degraded,
        "models": out_models,
        "engines": {name: e.as_dict() for name, e in manager_status.engines.items()},
        "requests": {
            "capacity": admission.capacity,
            "waiting": admission.waiting,
            "running": admission.running,
            "stalled_s": round(admission.stalled_s, 3),
        },
    }
    return Readiness(ready, status, body)


__all__ = [
    "DEGRADED",
    "DRAINING",
    "READY",
    "UNAVAILABLE",
    "HealthState",
    "ModelRequirement",
    "Readiness",
    "evaluate_readiness",
]
