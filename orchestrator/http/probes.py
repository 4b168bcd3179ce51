"""Liveness, readiness (``orchestrator.health`` decides, this answers) and the Prometheus endpoint."""

from __future__ import annotations

import time

from aiohttp import web

from orchestrator.health import ModelRequirement, evaluate_readiness
from orchestrator.http import errors as err
from orchestrator.state import STATE, ServerState


async def live(request: web.Request) -> web.Response:
    return web.json_response({"status": "alive"})


def readiness(state: ServerState):
    """The current :class:`~orchestrator.health.Readiness` of ``state``: a read of state with no side effects
    (no engine is asked for its status or probed, nothing expires), so probes may come at any rate."""
    return evaluate_readiness(
        models=[ModelRequirement(m.name, m.required, m.preload) for m in state.config.models],
        manager_status=state.manager.snapshot(),
        admission=state.admission.snapshot(),
        stuck_after_s=state.config.server.stuck_after_s,
        preload_pending=state.preload_pending,
        problems=state.health.problems() + (state.devices.problems(time.monotonic()) if state.devices else []),
    )


async def ready(request: web.Request) -> web.Response:
    result = readiness(request.app[STATE])
    headers = {"Retry-After": str(request.app[STATE].config.server.retry_after_s)} if not result.ready else None
    return web.json_response(result.body, status=result.http_status, headers=headers)


async def metrics_endpoint(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    metrics = state.metrics
    if state.metrics_handler is None:
        from prometheus_client.aiohttp import make_aiohttp_handler

        state.metrics_handler = make_aiohttp_handler(metrics.registry)
    try:
        return await state.metrics_handler(request)
    except Exception as exc:
        metrics.sampler_failed("exposition", exc)
        raise err.internal("metrics exposition failed; see the server log", code="metrics_failed") from None


__all__ = [
    "live",
    "metrics_endpoint",
    "readiness",
    "ready",
]
