"""The server's state: the :class:`ServerState` every handler reads, the manager's event hook that turns lifecycle
events into metrics, the running limit per model that admission asks for, and the background sample of the
manager's full status.

What can be derived is derived, not kept in copies: the engine serving a model is read from the manager (which
reads its fallback chain), and the running limit from the model's chain and the current config."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from orchestrator.admission import AdmissionQueue
from orchestrator.devices import DeviceBook
from orchestrator.errors import (
    MuaiError,
)
from orchestrator.health import HealthState
from orchestrator.metrics import ResourceSampler, ServerMetrics
from orchestrator.model_status import ManagerStatus
from orchestrator.tracing import Tracing

log = logging.getLogger("orchestrator.server")  # one logger name for the whole server, as before the split


UpdateConfig = Callable[[Any, dict[str, Any]], Any]


class ServerError(MuaiError, RuntimeError):
    """The server could not start (e.g. its port is taken)."""


@dataclass(eq=False)
class ServerState:
    """Everything a handler needs, kept on the app under :data:`STATE`."""

    config: Any
    manager: Any
    admission: AdmissionQueue
    metrics: ServerMetrics | None
    tracing: Tracing
    health: HealthState
    update_config: UpdateConfig | None
    owns_manager: bool
    workflows: dict[str, Any] | None = None
    preload_pending: set[str] = field(default_factory=set)
    sampler: ResourceSampler | None = None
    metrics_handler: Any = None
    devices: DeviceBook | None = None

    def engine_of(self, model: str) -> str:
        """The engine serving ``model`` now, ``unknown`` when none does (not loaded, not a model)."""
        return self.manager.engine_of(model) or "unknown"

    def model_config(self, name: str) -> Any | None:
        for model in self.config.models:
            if model.name == name:
                return model
        return None


STATE: web.AppKey[ServerState] = web.AppKey("muai_server_state", ServerState)


def make_event_hook(state_ref: list[ServerState]) -> Callable[[Any], None]:
    """``on_event`` for the manager: ``ModelEvent`` lifecycle events and fallbacks become metrics; a fallback away
    from a device fault cordons that device."""

    def on_event(event: Any) -> None:
        if not state_ref:
            return
        state = state_ref[0]
        try:
            kind, model, engine = event.kind, str(event.model), event.engine
            metrics = state.metrics
            if kind == "fallback":
                detail = event.detail
                device = getattr(detail, "device", None)
                if device and state.devices is not None:
                    faulted = state.devices.fault(device, f"model {model} on {getattr(detail, 'from_engine', '?')}: "
                                                          f"{getattr(detail, 'detail', '')}", time.monotonic())
                    move_off = getattr(state.manager, "move_off", None)
                    if faulted is not None and move_off is not None:
                        # Off the chain's switch thread, which reloading this very model would wait on.
                        threading.Thread(target=move_off, args=(faulted.id,), name=f"muai-move-off-{faulted.id}",
                                         daemon=True).start()
                from_engine = str(getattr(detail, "from_engine", "") or "")
                reason = str(getattr(detail, "reason", "") or event.error or "error")
                if metrics is not None:
                    metrics.on_fallback(model, from_engine, str(engine or "none"), _reason_label(reason))
                return
            if metrics is not None:
                metrics.on_lifecycle(model, kind, engine=engine, duration_s=event.duration_s)
        except Exception as exc:  # telemetry never breaks the manager
            log.debug("ignoring model event %r: %r", event, exc)

    return on_event


def _reason_label(reason: str) -> str:
    # The chain's reasons are a small vocabulary (unavailable, load_error, inference_error); anything else is
    # cut to its first word so the label stays bounded.
    head = reason.split(":", 1)[0].strip()
    return head if head and " " not in head and len(head) <= 40 else "error"


def attach_hooks(manager: Any, on_event: Callable[[Any], None], metrics: ServerMetrics | None) -> None:
    """Point a manager built elsewhere at our hooks, where it lets us (attributes it already has)."""
    if getattr(manager, "on_event", None) is None and hasattr(manager, "on_event"):
        manager.on_event = on_event
    if metrics is not None and hasattr(manager, "on_batch") and getattr(manager, "on_batch", None) is None:
        manager.on_batch = metrics.on_batch


def running_limit(state: ServerState, model: str) -> int | None:
    """How many requests of ``model`` may be inside the engine layer at once (the rest wait in our queue).

    Engines with continuous batching (vLLM) take everything at once, unless ``server.max_running_per_model`` (a
    tuner knob) says otherwise. Behind the dynamic batcher, two batches' worth
    (one running, the next filling). Without batching, one: the engine runs one request at a time anyway, and our
    queue is where the waiting shows (queue time, ``muai_requests_waiting``).

    Computed per request from the model's chain and the current config (a dict lookup and two attribute reads), so
    a fallback, a reload or a runtime config change shows at once with no cache to invalidate.
    """
    manager = state.manager
    get = getattr(manager, "get_model", None)
    if get is None or model.startswith("workflow:"):
        return None
    try:
        chain = get(model).chain
        if chain is None:
            return None
        if chain.capabilities.continuous_batching:
            return state.config.server.max_running_per_model
    except Exception:
        return None  # not ready: let the request through to get its proper error
    batching = state.config.batching
    return 2 * batching.max_batch_size if batching.enabled else 1


def bind_queue_gauges(state: ServerState, model: str) -> None:
    counts = state.admission.state.counts(model)
    state.metrics.bind_queue_gauges(model, lambda: counts.waiting, lambda: counts.running)


async def refresh_status(state: ServerState) -> ManagerStatus | None:
    """Sample the manager's full status on a worker thread (it asks every engine for its status and probes the
    engines no model holds, which may import an engine library); what readiness then reads as the engines'
    availability. None when the manager failed (logged)."""
    try:
        return await asyncio.to_thread(state.manager.status)
    except Exception as exc:
        log.warning("model manager status failed: %r", exc)
        return None


__all__ = [
    "STATE",
    "ServerError",
    "ServerState",
    "UpdateConfig",
    "attach_hooks",
    "bind_queue_gauges",
    "make_event_hook",
    "refresh_status",
    "running_limit",
]
