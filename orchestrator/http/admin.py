"""The admin API (``/admin/*``, bearer token compared in constant time): runtime configuration, model load and
unload, ending a conversation's KV cache, the device inventory and its cordons."""

from __future__ import annotations

import hmac
import inspect
import logging
import time
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from orchestrator.devices import UnknownDeviceError
from orchestrator.http import errors as err
from orchestrator.http.errors import ApiError
from orchestrator.http.frame import read_body
from orchestrator.http.schemas import CordonRequest
from orchestrator.runtime_config import is_restart_only
from orchestrator.state import STATE, ServerState, refresh_status

log = logging.getLogger("orchestrator.server")  # one logger name for the whole server, as before the split


def _authorise(request: web.Request) -> ServerState:
    state = request.app[STATE]
    expected = state.config.server.admin_token or ""
    given = request.headers.get("Authorization", "")
    scheme, _, token = given.partition(" ")
    ok = bool(expected) and scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), expected.encode())
    if not ok:
        raise ApiError(401, "admin API: missing or wrong bearer token", type_="authentication_error",
                       code="invalid_token", headers={"WWW-Authenticate": 'Bearer realm="muai-admin"'})
    return state


def _redacted(config: Any) -> dict[str, Any]:
    secret = {"admin_token", "secret", "bearer_token", "password"}

    def scrub(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: ("***" if k in secret and v else scrub(v)) for k, v in node.items()}
        if isinstance(node, list):
            return [scrub(v) for v in node]
        return node

    return scrub(config.model_dump(mode="json"))


async def _read_object(request: web.Request, limit: int) -> dict[str, Any]:
    doc = err.parse_json(await read_body(request, limit))
    if not isinstance(doc, dict):
        raise err.bad_json("request body must be a JSON object")
    return doc


async def admin_get_config(request: web.Request) -> web.Response:
    state = _authorise(request)
    return web.json_response({"config": _redacted(state.config)})


async def admin_patch_config(request: web.Request) -> web.Response:
    state = _authorise(request)
    if state.update_config is None:
        raise ApiError(501, "runtime configuration updates are not available in this server (no config updater)",
                       type_="server_error", code="not_implemented")
    patch = await _read_object(request, state.config.server.max_body_bytes)
    try:
        new_config, changed = state.update_config(state.config, patch)
    except ValueError as exc:
        key = getattr(exc, "key", "") or ""
        if is_restart_only(state.config, key):
            raise ApiError(409, str(exc), code="critical_key", param=key) from None
        raise err.invalid_field(key or None, str(exc)) from None
    changed = list(changed)
    if changed:
        try:
            applied = state.manager.apply_config(new_config)
            if inspect.isawaitable(applied):
                await applied
        except Exception as exc:
            log.exception("applying a runtime configuration change failed")
            raise err.internal(f"the change was valid but applying it failed: {type(exc).__name__}: {exc}",
                               code="apply_failed") from None
        _apply_server_runtime(state, new_config)
        log.info("runtime configuration changed: %s", ", ".join(changed))
    return web.json_response({"changed": changed, "config": _redacted(new_config)})


def _apply_server_runtime(state: ServerState, new_config: Any) -> None:
    state.config = new_config
    state.admission.state.capacity = new_config.server.queue_capacity
    state.admission.kick()
    state.tracing.set_sampling_ratio(new_config.telemetry.tracing.sampling_ratio)


async def admin_load_model(request: web.Request) -> web.Response:
    state = _authorise(request)
    name = request.match_info["name"]
    if name not in state.manager.models():
        raise err.unknown_model(name, state.manager.models())
    try:
        await state.manager.aload_model(name)
    except Exception as exc:
        raise ApiError(500, f"loading model {name!r} failed: {exc}", type_="server_error",
                       code="model_load_failed") from None
    status = await refresh_status(state)
    entry = status.models.get(name) if status is not None else None
    return web.json_response({"model": name, "status": entry.as_dict() if entry is not None else {}})


async def admin_unload_model(request: web.Request) -> web.Response:
    state = _authorise(request)
    name = request.match_info["name"]
    if name not in state.manager.models():
        raise err.unknown_model(name, state.manager.models())
    # The async unload lets a running batch finish and keeps the engine shutdown off the event loop.
    unloaded = await state.manager.aunload_model(name)
    return web.json_response({"model": name, "unloaded": bool(unloaded)})


async def admin_end_conversation(request: web.Request) -> web.Response:
    state = _authorise(request)
    cid = request.match_info["id"]
    released = state.manager.end_conversation(cid)
    if inspect.isawaitable(released):
        released = await released
    return web.json_response({"conversation_id": cid, "released": bool(released)})


def _book(state: ServerState):
    if state.devices is None:
        raise ApiError(501, "this server keeps no device inventory", type_="server_error", code="not_implemented")
    return state.devices


def _device(state: ServerState, device: str):
    try:
        return _book(state).get(device)
    except UnknownDeviceError as exc:
        raise ApiError(404, str(exc), code="device_not_found", param="id") from None


async def admin_devices(request: web.Request) -> web.Response:
    state = _authorise(request)
    now = time.monotonic()
    on = getattr(state.manager, "models_on_devices", dict)()
    return web.json_response({"devices": [{**d.as_dict(now), "models": on.get(d.id, [])}
                                          for d in _book(state).devices(now)]})


async def admin_cordon_device(request: web.Request) -> web.Response:
    """Body optional: ``{"reason": "..."}`` (the sidecar sends its alert's summary)."""
    state = _authorise(request)
    device = request.match_info["id"]
    _device(state, device)
    raw = await read_body(request, state.config.server.max_body_bytes)
    try:
        body = CordonRequest.model_validate_json(raw) if raw.strip() else CordonRequest()
    except ValidationError as exc:
        raise err.from_validation(exc.errors(include_url=False, include_input=False)) from None
    now = time.monotonic()
    return web.json_response({"device": state.devices.cordon(device, body.reason, now).as_dict(now)})


async def admin_uncordon_device(request: web.Request) -> web.Response:
    state = _authorise(request)
    device = request.match_info["id"]
    _device(state, device)
    now = time.monotonic()
    return web.json_response({"device": state.devices.uncordon(device, now).as_dict(now)})


__all__ = [
    "admin_cordon_device",
    "admin_devices",
    "admin_end_conversation",
    "admin_get_config",
    "admin_load_model",
    "admin_patch_config",
    "admin_uncordon_device",
    "admin_unload_model",
]
