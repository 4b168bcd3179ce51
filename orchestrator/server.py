"""The orchestrator's HTTP server (`muai serve`): an OpenAI-compatible API with bounded admission, graceful drain,
readiness that tells the truth, Prometheus metrics and OpenTelemetry traces.

Endpoints:

- ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true`` as server-sent events ending in
  ``data: [DONE]``), ``POST /v1/embeddings``, ``GET /v1/models``, ``GET /v1/models/{model}``,
  ``POST /v1/workflows/{name}`` (body ``{"parameters": {...}}``);
- ``GET /health/live`` (the process answers), ``GET /health/ready`` (see ``orchestrator.health``);
- ``GET /openapi.json``: this server's routes as OpenAPI 3.1 (``orchestrator.http.openapi``);
- ``GET /metrics`` (``telemetry.metrics.path``) here, or on its own port when ``telemetry.metrics.port`` is set;
- ``/admin/*`` with ``Authorization: Bearer <server.admin_token>`` (compared in constant time; no token configured
  means no admin API, 404): ``GET``/``PATCH /admin/config``, ``POST /admin/models/{name}/load`` and ``/unload``,
  ``DELETE /admin/conversations/{id}``, ``GET /admin/devices``, ``POST /admin/devices/{id}/cordon`` and ``/uncordon``.

A request's path: parse and validate (400/413/422), resolve the model (404), admit (429 when the queue is full, 503
while draining, both with ``Retry-After``), wait for a running slot (queue time), run through the model manager
(which batches for engines without continuous batching), answer. ``server.request_timeout_s`` bounds everything
after admission (504). Every request to ``/v1`` is a ``SERVER`` span continuing an incoming ``traceparent``, with
the HTTP attributes. Once the request is admitted it also carries ``gen_ai.operation.name``, ``muai.request = true``
and ``gen_ai.request.model`` (a workflow names itself with ``muai.workflow`` instead, as ``docs/sidecar-api.md``
says), so the sidecar counts admitted requests, not rejections; a 5xx sets status ERROR and ``error.type``. The model
manager's inference spans (and a workflow's step spans) are its children.

Metrics (``orchestrator.metrics``) are observed once per request on children bound per (model, engine); engine,
resource and throughput gauges are sampled by a background loop, never on the request path.

Shutdown (``serve``): SIGTERM or SIGINT stops admitting (new requests get 503 + ``Retry-After``, readiness 503),
waits up to ``server.drain_timeout_s`` for every admitted request (streams included) to finish, then closes the
listener, gives open connections what is left of the drain timeout (at least a second) before cancelling their
handlers, closes the models and flushes the spans; the exit status is 0. A second signal (logged) skips the waits:
requests still running are cancelled. A client that disconnects has its request cancelled (out of the queue or its
batch) as soon as aiohttp notices.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from orchestrator.admission import AdmissionQueue
from orchestrator.devices import DeviceBook, discover
from orchestrator.health import HealthState
from orchestrator.http.admin import (
    admin_cordon_device,
    admin_devices,
    admin_end_conversation,
    admin_get_config,
    admin_load_model,
    admin_patch_config,
    admin_uncordon_device,
    admin_unload_model,
)
from orchestrator.http.errors import error_middleware
from orchestrator.http.frame import map_exception
from orchestrator.http.openai import (
    chat_completions,
    completions,
    embeddings,
    get_model,
    list_models,
)
from orchestrator.http.openapi import OPENAPI, OPENAPI_PATH, openapi_document, openapi_endpoint
from orchestrator.http.probes import live, metrics_endpoint, readiness, ready
from orchestrator.http.workflow_routes import run_workflow
from orchestrator.lifecycle import (
    MIN_SHUTDOWN_GRACE_S,
    close_connections,
    lifecycle,
    listener_ssl_context,
    shutdown_grace,
)
from orchestrator.metrics import ServerMetrics, runtime_settings
from orchestrator.state import (
    STATE,
    ServerError,
    ServerState,
    UpdateConfig,
    attach_hooks,
    bind_queue_gauges,
    make_event_hook,
    running_limit,
)
from orchestrator.tls import TlsConfigError
from orchestrator.tracing import build_tracing

log = logging.getLogger("orchestrator.server")  # one logger name for the whole server, as before the split


def create_app(
    config: Any,
    *,
    manager: Any = None,
    update_config: UpdateConfig | None = None,
    registry: Any = None,
    tracer_provider: Any = None,
    workflows: dict[str, Any] | None = None,
    engine_factory: Callable[..., Any] | None = None,
) -> web.Application:
    """The server as an aiohttp application.

    ``config`` is the whole ``MuaiConfig``. ``manager`` defaults to a new ``ModelManager(config)`` that the app
    owns (and closes); one passed in stays the caller's. ``update_config(config, patch) -> (new_config, changed)``
    is the validated runtime update (``muai.config.apply_update``); without it ``PATCH /admin/config`` answers 501.
    ``registry`` is the Prometheus registry (a fresh one by default); ``tracer_provider`` replaces the provider
    built from ``telemetry.tracing``. ``workflows`` defaults to ``orchestrator.workflows.default_workflows(manager)``.
    ``engine_factory`` goes to the manager the app builds (tests and drills use it to share echo faults).
    """
    health = HealthState()
    metrics = ServerMetrics(registry, on_problem=health.report) if config.telemetry.metrics.enabled else None
    tracing = build_tracing(
        config.telemetry.tracing,
        tracer_provider=tracer_provider,
        on_export_failure=metrics.trace_export_failed if metrics is not None else None,
        on_health=lambda problem: health.report("traces", problem),
        on_spans_dropped=metrics.on_spans_dropped if metrics is not None else None,
    )
    state_ref: list[ServerState] = []
    on_event = make_event_hook(state_ref)
    owns_manager = manager is None
    if manager is None:
        from orchestrator.manager import ModelManager

        manager = ModelManager(
            config, on_event=on_event, tracer=tracing.tracer,
            on_batch=metrics.on_batch if metrics is not None else None, engine_factory=engine_factory,
        )
    else:
        attach_hooks(manager, on_event, metrics)

    admission = AdmissionQueue(
        capacity=config.server.queue_capacity, running_limit=lambda model: running_limit(state_ref[0], model),
        max_wait_s=lambda: state_ref[0].config.server.max_queue_wait_s,
    )
    state = ServerState(
        config=config, manager=manager, admission=admission, metrics=metrics, tracing=tracing, health=health,
        update_config=update_config, owns_manager=owns_manager, workflows=workflows,
        devices=DeviceBook(discover(), reprobe_after_s=config.engines.reprobe_after_s),
    )
    if hasattr(manager, "devices"):
        manager.devices = state.devices
    state_ref.append(state)
    if metrics is not None:
        for model in config.models:
            bind_queue_gauges(state, model.name)
        metrics.settings = lambda: runtime_settings(state.config)

    app = web.Application(client_max_size=config.server.max_body_bytes, middlewares=[error_middleware])
    app[STATE] = state
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model:.+}", get_model)
    app.router.add_post("/v1/workflows/{name}", run_workflow)
    app.router.add_get("/health/live", live)
    app.router.add_get("/health/ready", ready)
    metrics_cfg = config.telemetry.metrics
    app[OPENAPI] = openapi_document(
        metrics_path=metrics_cfg.path if metrics is not None and metrics_cfg.port is None else None,
        admin=bool(config.server.admin_token))
    app.router.add_get(OPENAPI_PATH, openapi_endpoint)
    if metrics is not None and metrics_cfg.port is None:
        app.router.add_get(metrics_cfg.path, metrics_endpoint)
    if config.server.admin_token:
        app.router.add_get("/admin/config", admin_get_config)
        app.router.add_patch("/admin/config", admin_patch_config)
        app.router.add_post("/admin/models/{name}/load", admin_load_model)
        app.router.add_post("/admin/models/{name}/unload", admin_unload_model)
        app.router.add_delete("/admin/conversations/{id}", admin_end_conversation)
        app.router.add_get("/admin/devices", admin_devices)
        app.router.add_post("/admin/devices/{id}/cordon", admin_cordon_device)
        app.router.add_post("/admin/devices/{id}/uncordon", admin_uncordon_device)
    app.cleanup_ctx.append(lifecycle)
    return app


def serve(config: Any, *, update_config: UpdateConfig | None = None) -> int:
    """Run the server until SIGTERM/SIGINT, drain, and return the exit status (0 after a clean drain)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(_serve(config, update_config))


async def _serve(config: Any, update_config: UpdateConfig | None) -> int:
    server_cfg = config.server
    try:
        ssl_context = listener_ssl_context(config)
    except TlsConfigError as exc:
        log.error("cannot serve HTTPS: %s", exc)
        return 1
    app = create_app(config, update_config=update_config)
    state = app[STATE]
    # handler_cancellation: a client that disconnects has its handler cancelled, so its request leaves the queue
    # or its batch (aiohttp's default is to let it run on; its TestServer cancels, so tests alone would not show
    # it). shutdown_timeout is the last resort for connections close_connections could not finish.
    # auto_decompress=False: request bodies are inflated by the handlers, bounded (orchestrator.http.frame.read_body).
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=MIN_SHUTDOWN_GRACE_S,
                           auto_decompress=False)
    await runner.setup()
    site = web.TCPSite(runner, server_cfg.host, server_cfg.port, ssl_context=ssl_context)
    try:
        await site.start()
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", server_cfg.host, server_cfg.port, exc.strerror or exc)
        await runner.cleanup()
        return 1
    pid_file = Path(server_cfg.pid_file) if server_cfg.pid_file else None
    if pid_file is not None:
        pid_file.parent.mkdir(parents=True, exist_ok=True)
        pid_file.write_text(f"{os.getpid()}\n")
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    hurry = asyncio.Event()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("second %s: not waiting for in-flight requests", signal.Signals(signum).name)
            hurry.set()
        else:
            log.info("%s: draining", signal.Signals(signum).name)
            stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    log.info("serving on %s://%s:%d", "https" if ssl_context else "http", server_cfg.host, server_cfg.port)
    deadline: float | None = None
    try:
        await stop.wait()
        state.admission.drain()
        deadline = loop.time() + server_cfg.drain_timeout_s
        in_flight = state.admission.state.in_flight
        log.info("draining: %d admitted requests in flight, waiting up to %gs", in_flight, server_cfg.drain_timeout_s)
        idle = asyncio.create_task(state.admission.wait_idle(server_cfg.drain_timeout_s))
        hurried = asyncio.create_task(hurry.wait())
        await asyncio.wait({idle, hurried}, return_when=asyncio.FIRST_COMPLETED)
        hurried.cancel()
        if not idle.done() or not idle.result():
            idle.cancel()
            log.warning("drain ended with %d requests unfinished", state.admission.state.in_flight)
        else:
            log.info("drained")
    finally:
        grace = shutdown_grace(deadline, loop.time(), hurried=hurry.is_set())
        await close_connections(runner, grace, hurry)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await runner.cleanup()
        if pid_file is not None:
            try:
                pid_file.unlink()
            except OSError:
                pass
    return 0


__all__ = [
    "STATE",
    "ServerError",
    "ServerState",
    "create_app",
    "map_exception",
    "readiness",
    "serve",
]
