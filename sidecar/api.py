"""The sidecar's query API and its own endpoints: ``/api/v1/stats|gpus|host|alerts|tuner``, ``PATCH
/api/v1/config``, ``/metrics``, ``/health``, and the one JSON error shape (a middleware)."""

from __future__ import annotations

import asyncio
import datetime as _dt
import logging
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from sidecar.errors import MalformedPayload, PayloadTooLarge
from sidecar.otlp import (
    INFERENCE,
    REQUEST,
    load_json,
)
from sidecar.state import STATE, SidecarState

log = logging.getLogger("muai.sidecar")

_READ_CHUNK = 64 * 1024


def json_error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": {"code": status, "message": message, **extra}}, status=status)


@web.middleware
async def json_errors(request: web.Request, handler):
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return json_error(exc.status, exc.reason, **({"allowed": sorted(exc.allowed_methods)} if isinstance(exc, web.HTTPMethodNotAllowed) else {}))
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return json_error(500, "internal error")


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return _dt.datetime.fromtimestamp(ts, tz=_dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def get_stats(request: web.Request) -> web.Response:
    state = request.app[STATE]
    q = request.query
    window = q.get("window") or None
    if window is not None and window not in state.monitor.windows:
        return json_error(422, f"unknown window {window!r}", windows=list(state.monitor.windows))
    scope_arg = q.get("scope", REQUEST)
    if scope_arg not in (REQUEST, INFERENCE, "all"):
        return json_error(422, f"unknown scope {scope_arg!r}", scopes=[REQUEST, INFERENCE, "all"])
    model = q.get("model") or None
    stats = state.monitor.stats(
        state.clock(),
        model=model,
        operation=q.get("operation") or None,
        window=window,
        scope=None if scope_arg == "all" else scope_arg,
    )
    if model is not None and not stats and not any(k.model == model for k in state.monitor.keys(scope=None)):
        return json_error(404, f"unknown model {model!r}")
    return web.json_response(
        {
            "time": iso(state.wall_clock()),
            "windows": state.monitor.windows,
            "stats": [s.to_json() for s in stats],
        }
    )


async def get_gpus(request: web.Request) -> web.Response:
    state = request.app[STATE]
    gpu = state.gpu
    now = state.clock()
    gpus = []
    for g in state.gpu_samples:
        d = g.as_dict()
        idx = str(g.index)
        d["windows"] = {
            "utilization_ratio": state.monitor.resource_stats("gpu_utilization_ratio", idx, now),
            "framebuffer_used_percent": state.monitor.resource_stats("gpu_framebuffer_used_percent", idx, now),
            "power_watts": state.monitor.resource_stats("gpu_power_watts", idx, now),
        }
        gpus.append(d)
    return web.json_response(
        {
            "available": bool(gpu is not None and gpu.available),
            "reason": "GPU collector disabled" if gpu is None else gpu.reason,
            "driver_version": None if gpu is None else gpu.driver_version,
            "count": len(gpus),
            "sampled_at": iso(state.gpu_sampled_at),
            "gpus": gpus,
        }
    )


async def get_host(request: web.Request) -> web.Response:
    state = request.app[STATE]
    now = state.clock()
    sample = state.host_sample
    r = state.monitor.resource_stats
    return web.json_response(
        {
            "enabled": state.host is not None,
            "sampled_at": iso(state.host_sampled_at),
            "host": None if sample is None else sample.as_dict(),
            "windows": {
                "cpu_percent": r("host_cpu_percent", "", now),
                "memory_percent": r("host_memory_percent", "", now),
                "orchestrator_cpu_percent": r("orchestrator_cpu_percent", "", now),
                "orchestrator_rss_bytes": r("orchestrator_rss_bytes", "", now),
            },
        }
    )


def sink_stats(state: SidecarState) -> dict[str, Any]:
    out = {}
    for dispatcher in state.dispatchers:
        for name, st in dispatcher.stats().items():
            out[name] = {
                "sent": st.sent, "failed": st.failed, "dropped": st.dropped, "retries": st.retries,
                "suppressed": st.suppressed, "queued": st.queued, "last_error": st.last_error,
            }
    return out


async def get_alerts(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = state.book.to_json()
    body["enabled"] = state.evaluator is not None
    body["sinks"] = sink_stats(state)
    return web.json_response(body)


async def get_tuner(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = state.tuner.describe() if state.tuner is not None else {"enabled": False, "active": False}
    return web.json_response({"time": iso(state.wall_clock()), **body})


async def patch_config(request: web.Request) -> web.Response:
    """Runtime keys of the sidecar (``detectors.*``), as ``sidecar.runtime_update`` validates them. Bearer auth with
    the stack's admin token (``sidecar.tuner.admin_token``, which ``muai up`` sets to the orchestrator's); without one
    the endpoint is off (404), as the orchestrator's admin API is."""
    import hmac

    from sidecar.runtime_update import SidecarUpdateError, apply_patch

    state = request.app[STATE]
    secret = state.config.tuner.admin_token
    if secret is None:
        return json_error(404, "runtime configuration is off: no admin token (sidecar.tuner.admin_token)")
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), secret.get_secret_value().encode()):
        return json_error(401, "missing or wrong bearer token")
    try:
        patch = load_json(await read_body(request, state.config.receiver.max_body_bytes))
    except PayloadTooLarge as exc:
        return json_error(413, str(exc))
    except MalformedPayload as exc:
        return json_error(400, str(exc))
    try:
        new, changed = apply_patch(state.config, patch)
    except SidecarUpdateError as exc:
        return json_error(exc.status, str(exc), key=exc.key)
    if changed:
        state.config = new
        state.reconfigure_detectors(new.detectors)
        log.info("runtime configuration changed: %s", ", ".join(changed))
    return web.json_response({"changed": changed})


async def get_metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    # The collector reads windows that only this loop's thread may touch, so render here, not in a thread.
    body = generate_latest(state.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def get_health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    gpu = state.gpu
    degraded = dict(state.loop_errors)
    fwd = state.forwarder
    return web.json_response(
        {
            "status": "degraded" if degraded else "ok",
            "uptime_s": max(0.0, state.clock() - state.started_at),
            "series": state.monitor.series_count,
            "samples": state.monitor.samples,
            "gpu": {"available": bool(gpu is not None and gpu.available), "reason": "disabled" if gpu is None else gpu.reason},
            "host": {"enabled": state.host is not None},
            "detectors": {"enabled": state.evaluator is not None, "ticks": 0 if state.evaluator is None else state.evaluator.ticks},
            "alerts": state.book.counts(),
            "tuner": None if state.tuner is None else {"active": state.tuner.active, "status": state.tuner.describe()["status"]},
            "forwarding": None if fwd is None else {
                "endpoint": fwd.endpoint, "sent": fwd.sent, "failed": fwd.failed, "dropped": fwd.dropped, "queued": fwd.queued,
                "queued_bytes": fwd.queued_bytes,
            },
            "degraded": degraded,
        }
    )


async def read_body(request: web.Request, limit: int) -> bytes:
    chunks = []
    size = 0
    while True:
        try:
            chunk = await request.content.read(_READ_CHUNK)
        except RequestPayloadError as exc:  # e.g. aiohttp's own gzip inflation failed
            raise MalformedPayload(f"could not read the body: {exc}") from exc
        if not chunk:
            break
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body exceeds the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


__all__ = [
    "get_alerts",
    "get_gpus",
    "get_health",
    "get_host",
    "get_metrics",
    "get_stats",
    "get_tuner",
    "iso",
    "json_error",
    "json_errors",
    "patch_config",
    "read_body",
    "sink_stats",
]
