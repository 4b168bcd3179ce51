"""The orchestrator's HTTP server (`muai serve`): an OpenAI-compatible API with bounded admission, graceful drain,
readiness that tells the truth, Prometheus metrics and OpenTelemetry traces.

Endpoints:

- ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true`` as server-sent events ending in
  ``data: [DONE]``), ``POST /v1/embeddings``, ``GET /v1/models``, ``GET /v1/models/{model}``,
  ``POST /v1/workflows/{name}`` (body ``{"parameters": {...}}``);
- ``GET /health/live`` (the process answers), ``GET /health/ready`` (see ``orchestrator.health``);
- ``GET /metrics`` (``telemetry.metrics.path``) here, or on its own port when ``telemetry.metrics.port`` is set;
- ``/admin/*`` with ``Authorization: Bearer <server.admin_token>`` (compared in constant time; no token configured
  means no admin API, 404): ``GET``/``PATCH /admin/config``, ``POST /admin/models/{name}/load`` and ``/unload``,
  ``DELETE /admin/conversations/{id}``.

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
import hmac
import inspect
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from opentelemetry.trace import SpanKind, Status, StatusCode
from pydantic import BaseModel, ValidationError

from adapters.base import (
    EngineError,
    EngineUnavailableError,
    GenerationRequest,
    GenerationResult,
    InvalidRequestError,
    SamplingParams,
)
from orchestrator.admission import DRAINING, AdmissionQueue, AdmissionRejected, Ticket
from orchestrator.errors import (
    BatcherClosedError,
    ModelLoadFailedError,
    ModelNotReadyError,
    MuaiError,
    UnknownModelError,
    WorkflowValidationError,
)
from orchestrator.health import HealthState, ModelRequirement, evaluate_readiness
from orchestrator.http import errors as err
from orchestrator.http.errors import ApiError, error_middleware
from orchestrator.http.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    WorkflowRequest,
    encode_embedding,
    finish_reason,
    new_id,
    now_s,
    render_chat,
    usage,
)
from orchestrator.metrics import ModelMetrics, ResourceSampler, ServerMetrics, runtime_settings
from orchestrator.tracing import Tracing, build_tracing, extract_context

log = logging.getLogger(__name__)

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
UpdateConfig = Callable[[Any, dict[str, Any]], Any]


class ServerError(MuaiError, RuntimeError):
    """The server could not start (e.g. its port is taken)."""


# --------------------------------------------------------------------------------------------------------------
# State


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
    engines: dict[str, str] = field(default_factory=dict)
    """model -> engine serving it, kept current from lifecycle/fallback events and the background loop."""
    sampler: ResourceSampler | None = None
    last_status: dict[str, Any] = field(default_factory=dict)
    metrics_handler: Any = None
    limits: dict[str, tuple[str | None, int | None]] = field(default_factory=dict)

    def engine_of(self, model: str) -> str:
        return self.engines.get(model, "unknown")

    def model_config(self, name: str) -> Any | None:
        for model in self.config.models:
            if model.name == name:
                return model
        return None


STATE: web.AppKey[ServerState] = web.AppKey("muai_server_state", ServerState)


# --------------------------------------------------------------------------------------------------------------
# Hooks from the model manager


def _make_event_hook(state_ref: list[ServerState]) -> Callable[[Any], None]:
    """``on_event`` for the manager: ``ModelEvent`` lifecycle events and fallbacks become metrics and keep the
    model -> engine map current."""

    def on_event(event: Any) -> None:
        if not state_ref:
            return
        state = state_ref[0]
        try:
            kind, model, engine = event.kind, str(event.model), event.engine
            metrics = state.metrics
            if kind == "fallback":
                detail = event.detail
                from_engine = str(getattr(detail, "from_engine", "") or "")
                reason = str(getattr(detail, "reason", "") or event.error or "error")
                if metrics is not None:
                    metrics.on_fallback(model, from_engine, str(engine or "none"), _reason_label(reason))
                if engine:
                    state.engines[model] = str(engine)
                return
            if kind == "load_ok" and engine:
                state.engines[model] = str(engine)
            elif kind == "unload":
                state.engines.pop(model, None)
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


# --------------------------------------------------------------------------------------------------------------
# App


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
    on_event = _make_event_hook(state_ref)
    owns_manager = manager is None
    if manager is None:
        from orchestrator.manager import ModelManager

        manager = ModelManager(
            config, on_event=on_event, tracer=tracing.tracer,
            on_batch=metrics.on_batch if metrics is not None else None, engine_factory=engine_factory,
        )
    else:
        _attach_hooks(manager, on_event, metrics)

    admission = AdmissionQueue(
        capacity=config.server.queue_capacity, running_limit=lambda model: _running_limit(state_ref[0], model)
    )
    state = ServerState(
        config=config, manager=manager, admission=admission, metrics=metrics, tracing=tracing, health=health,
        update_config=update_config, owns_manager=owns_manager, workflows=workflows,
    )
    state_ref.append(state)
    if metrics is not None:
        for model in config.models:
            _bind_queue_gauges(state, model.name)
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
    if metrics is not None and metrics_cfg.port is None:
        app.router.add_get(metrics_cfg.path, metrics_endpoint)
    if config.server.admin_token:
        app.router.add_get("/admin/config", admin_get_config)
        app.router.add_patch("/admin/config", admin_patch_config)
        app.router.add_post("/admin/models/{name}/load", admin_load_model)
        app.router.add_post("/admin/models/{name}/unload", admin_unload_model)
        app.router.add_delete("/admin/conversations/{id}", admin_end_conversation)
    app.cleanup_ctx.append(_lifecycle)
    return app


def _attach_hooks(manager: Any, on_event: Callable[[Any], None], metrics: ServerMetrics | None) -> None:
    """Point a manager built elsewhere at our hooks, where it lets us (attributes it already has)."""
    if getattr(manager, "on_event", None) is None and hasattr(manager, "on_event"):
        manager.on_event = on_event
    if metrics is not None and hasattr(manager, "on_batch") and getattr(manager, "on_batch", None) is None:
        manager.on_batch = metrics.on_batch


def _running_limit(state: ServerState, model: str) -> int | None:
    """How many requests of ``model`` may be inside the engine layer at once (the rest wait in our queue).

    Engines with continuous batching (vLLM) take everything at once, unless ``server.max_running_per_model`` (a
    tuner knob) says otherwise. Behind the dynamic batcher, two batches' worth
    (one running, the next filling). Without batching, one: the engine runs one request at a time anyway, and our
    queue is where the waiting shows (queue time, ``muai_requests_waiting``).
    """
    engine = state.engines.get(model)
    cached = state.limits.get(model)
    if cached is not None and cached[0] == engine:
        return cached[1]
    limit = _compute_running_limit(state, model)
    if engine is not None:  # cached until the model's engine (or the batching config) changes
        state.limits[model] = (engine, limit)
    return limit


def _compute_running_limit(state: ServerState, model: str) -> int | None:
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


def _bind_queue_gauges(state: ServerState, model: str) -> None:
    counts = state.admission.state.counts(model)
    state.metrics.bind_queue_gauges(model, lambda: counts.waiting, lambda: counts.running)


# --------------------------------------------------------------------------------------------------------------
# Background work: preload, telemetry sampling, the separate metrics port, orderly close


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    tasks = [asyncio.create_task(_preload(state), name="muai-preload"),
             asyncio.create_task(_telemetry_loop(state), name="muai-telemetry")]
    metrics_runner = await _start_metrics_port(state)
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if metrics_runner is not None:
            await metrics_runner.cleanup()
        if state.owns_manager:
            try:
                await state.manager.aclose()
            except Exception as exc:
                log.warning("closing the model manager failed: %r", exc)
        await asyncio.to_thread(state.tracing.shutdown, min(5.0, state.config.telemetry.tracing.export_timeout_s))
        if state.sampler is not None:
            state.sampler.close()


async def _preload(state: ServerState) -> None:
    preload = [m.name for m in state.config.models if m.preload]
    state.preload_pending.update(preload)
    for name in preload:
        started = time.monotonic()
        try:
            await state.manager.aload_model(name)
            log.info("model %s loaded in %.2fs", name, time.monotonic() - started)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("preloading model %s failed: %s", name, exc)
        finally:
            state.preload_pending.discard(name)
    _refresh_status(state)


def _refresh_status(state: ServerState) -> dict[str, Any]:
    try:
        status = state.manager.status()
    except Exception as exc:
        log.warning("model manager status failed: %r", exc)
        return state.last_status
    models = status.get("models", {}) if isinstance(status, dict) else {}
    for name, entry in models.items():
        engine = entry.get("engine") if isinstance(entry, dict) else None
        if engine:
            state.engines[name] = str(engine)
    state.last_status = status
    return status


async def _telemetry_loop(state: ServerState) -> None:
    interval = state.config.telemetry.metrics.resource_interval_s
    metrics = state.metrics
    if metrics is not None:
        try:
            state.sampler = ResourceSampler()
        except Exception as exc:
            metrics.sampler_failed("resources", exc)
    while True:
        _refresh_status(state)
        if metrics is not None:
            if state.sampler is not None:
                try:
                    metrics.set_resources(await asyncio.to_thread(state.sampler.sample))
                    metrics.sampler_ok("resources")
                except Exception as exc:
                    metrics.sampler_failed("resources", exc)
            metrics.sample_throughput(time.monotonic())
            try:
                for model, stats in _engine_stats(state).items():
                    metrics.set_engine_stats(model, stats)
                metrics.sampler_ok("engine_stats")
            except Exception as exc:
                metrics.sampler_failed("engine_stats", exc)
        await asyncio.sleep(interval)


def _engine_stats(state: ServerState) -> dict[str, dict[str, Any]]:
    """Engine-native counters (KV cache, prefix cache) of every loaded model, read from its fallback chain."""
    manager = state.manager
    out: dict[str, dict[str, Any]] = {}
    for name in manager.models():
        if not manager.is_loaded(name):
            continue
        chain = manager.get_model(name).chain
        stats = chain.stats() if chain is not None else {}
        if stats:
            out[name] = stats
    return out


async def _start_metrics_port(state: ServerState) -> web.AppRunner | None:
    cfg = state.config.telemetry.metrics
    if state.metrics is None or cfg.port is None:
        return None
    app = web.Application()
    app[STATE] = state
    app.router.add_get(cfg.path, metrics_endpoint)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, cfg.host, cfg.port).start()
    except OSError as exc:
        await runner.cleanup()
        problem = f"metrics port {cfg.host}:{cfg.port} could not be bound: {exc.strerror or exc}"
        log.error("%s; serving goes on without it", problem)
        state.health.report("metrics_port", problem)
        return None
    log.info("metrics on http://%s:%d%s", cfg.host, cfg.port, cfg.path)
    return runner


# --------------------------------------------------------------------------------------------------------------
# The per-request frame: parse, resolve, admit, time out, trace, measure


class _Call:
    """One request to /v1: its span, its admission ticket, what gets measured at the end."""

    __slots__ = (
        "state", "request", "operation", "span", "recording", "model", "ticket", "queue_s", "started",
        "first_token_at", "prompt_tokens", "completion_tokens", "finish_reasons", "status", "engine",
    )

    def __init__(self, state: ServerState, request: web.Request, operation: str, span: Any) -> None:
        self.state = state
        self.request = request
        self.operation = operation
        self.span = span
        self.recording = span.is_recording()
        self.model: str | None = None
        self.ticket: Ticket | None = None
        self.queue_s = 0.0
        self.started = time.monotonic()
        self.first_token_at: float | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.finish_reasons: list[str] = []
        self.status = "ok"
        self.engine = ""

    async def parse(self, schema: type[BaseModel]) -> Any:
        state = self.state
        if state.admission.state.draining:
            raise err.unavailable("the server is shutting down; retry on another replica", state.config.server.retry_after_s)
        limit = state.config.server.max_body_bytes
        if self.request.content_length is not None and self.request.content_length > limit:
            raise err.too_large(limit)
        try:
            body = await self.request.read()
        except web.HTTPRequestEntityTooLarge:
            raise err.too_large(limit) from None
        try:
            return schema.model_validate_json(body)
        except ValidationError as exc:
            raise err.from_validation(exc.errors(include_url=False, include_input=False)) from None

    def resolve(self, name: str, task: str) -> str:
        state = self.state
        try:
            known = state.manager.models()
        except Exception:
            known = [m.name for m in state.config.models]
        if name not in known:
            raise err.unknown_model(name, known)
        model_cfg = state.model_config(name)
        if model_cfg is not None and model_cfg.task != task:
            kind = "an embedding model" if model_cfg.task == "embed" else "a generative model"
            raise ApiError(400, f"model {name!r} is {kind}; it does not serve {self.operation}", code="wrong_model_task",
                           param="model", reject_reason="invalid")
        self.model = name
        return name

    @asynccontextmanager
    async def admitted(self, model_key: str) -> AsyncIterator[None]:
        """Admission (429/503), the running slot, the request timeout (504) and the outcome's bookkeeping."""
        state = self.state
        server = state.config.server
        try:
            ticket = state.admission.admit(model_key)
        except AdmissionRejected as exc:
            if exc.reason == DRAINING:
                raise err.unavailable(str(exc), server.retry_after_s) from None
            raise err.queue_full(str(exc), server.retry_after_s) from None
        self.ticket = ticket
        # Marked before waiting for a slot: a request that times out in the queue is still an admitted request
        # to the sidecar (its 504 counts), not an invisible one.
        self._mark_admitted()
        limit = server.request_timeout_s
        try:
            async with asyncio.timeout(limit):
                try:
                    self.queue_s = await state.admission.start(ticket)
                    yield
                except TimeoutError:
                    # Our deadline surfaces as CancelledError in here (TimeoutError only at the block's exit),
                    # so this one came from below.
                    raise err.internal("an engine timed out", code="engine_timeout") from None
        except TimeoutError:
            self.status = "timeout"
            raise err.timeout(limit) from None
        except ApiError as exc:
            self.status = "error" if exc.status >= 500 else "invalid"
            raise
        except asyncio.CancelledError:
            self.status = "cancelled"
            raise
        except Exception as exc:
            if isinstance(exc, EngineError):
                state.admission.progress()  # the engine answered, if with an error: it is not stuck
            mapped = map_exception(exc, state.config.server.retry_after_s)
            self.status = "error" if mapped.status >= 500 else "invalid"
            raise mapped from exc
        finally:
            # No progress() here: a timeout or a cancellation is not output, and counting it would hide an engine
            # that is stuck while requests keep timing out (see orchestrator.health).
            state.admission.finish(ticket)
            self._record()

    def _mark_admitted(self) -> None:
        self.engine = "workflow" if self.operation == "workflow" else self.state.engine_of(self.model or "")
        if self.recording:
            attributes: dict[str, Any] = {"gen_ai.operation.name": self.operation, "muai.request": True}
            # A workflow names itself with muai.workflow (docs/sidecar-api.md); its inference spans carry models.
            if self.model and self.operation != "workflow":
                attributes["gen_ai.request.model"] = self.model
            self.span.set_attributes(attributes)

    def result(self, prompt_tokens: int, completion_tokens: int, finish: str | None) -> None:
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        if finish:
            self.finish_reasons.append(finish)
        self.state.admission.progress()

    def first_token(self) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self.state.admission.progress()

    def _record(self) -> None:
        end = time.monotonic()
        e2e = end - (self.ticket.admitted_at if self.ticket else self.started)
        ttft = tpot = None
        if self.first_token_at is not None and self.ticket is not None:
            ttft = self.first_token_at - self.ticket.admitted_at
            if self.completion_tokens > 1:
                tpot = (end - self.first_token_at) / (self.completion_tokens - 1)
        metrics = self.state.metrics
        label = self.model or (self.ticket.model if self.ticket else "")
        if metrics is not None:
            metrics.request_done(label, self.operation, self.status)
            bound: ModelMetrics = metrics.model(label, self.engine or self.state.engine_of(label))
            if self.status == "ok":
                bound.observe(e2e_s=e2e, queue_s=self.queue_s, prompt_tokens=self.prompt_tokens,
                              completion_tokens=self.completion_tokens, ttft_s=ttft, tpot_s=tpot)
            else:
                # Every admitted outcome is in the latency histogram (timeouts and errors are the slow tail an
                # operator needs to see); muai_requests_total says how each ended. Queue time only once measured.
                queue_s = self.queue_s if self.ticket is not None and self.ticket.started_at is not None else None
                bound.observe_failed(e2e_s=e2e, queue_s=queue_s)
        if self.recording:
            # Kept short: every attribute costs on the request path and again when encoded for export. The
            # engine, batch size and finish reasons are on the inference span below.
            attributes: dict[str, Any] = {}
            if self.operation != "workflow" or self.prompt_tokens:
                attributes["gen_ai.usage.input_tokens"] = self.prompt_tokens
            if self.operation in ("chat", "text_completion") or self.completion_tokens:
                attributes["gen_ai.usage.output_tokens"] = self.completion_tokens
            if ttft is not None:
                attributes["gen_ai.latency.time_to_first_token"] = ttft
            self.span.set_attributes(attributes)


def map_exception(exc: BaseException, retry_after_s: int) -> ApiError:
    """Errors from the manager, workflows and engines as HTTP errors (no stack trace reaches the client)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, UnknownModelError):
        return err.unknown_model(exc.name, exc.registered)
    if isinstance(exc, ModelNotReadyError):
        return err.unavailable(str(exc), retry_after_s, code="model_not_ready", reject_reason=None)
    if isinstance(exc, ModelLoadFailedError):
        return err.unavailable(str(exc), retry_after_s, code="model_unavailable", reject_reason=None)
    if isinstance(exc, BatcherClosedError):
        return err.unavailable("the model was unloaded or the server is shutting down", retry_after_s,
                               reject_reason=None)
    if isinstance(exc, WorkflowValidationError):
        return err.invalid_field("parameters", f"parameters: {exc}")
    if isinstance(exc, InvalidRequestError):
        return ApiError(400, str(exc), code="invalid_request")
    if isinstance(exc, EngineUnavailableError):
        return err.unavailable(str(exc), retry_after_s, code="engine_unavailable", reject_reason=None)
    if isinstance(exc, EngineError):
        return err.internal(str(exc), code="engine_error")
    if isinstance(exc, MuaiError):
        return err.internal(str(exc))
    log.error("unexpected error while serving a request", exc_info=exc)
    return err.internal()


async def _traced(request: web.Request, operation: str, body: Callable[[_Call], Any]) -> web.StreamResponse:
    """Run ``body`` inside the request's root span (SERVER, continuing an incoming ``traceparent``)."""
    state = request.app[STATE]
    tracing = state.tracing
    parent = extract_context(request.headers) if tracing.enabled else None
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else request.path
    with tracing.tracer.start_as_current_span(
        f"{request.method} {route}", context=parent, kind=SpanKind.SERVER,
        record_exception=False, set_status_on_exception=False,
    ) as span:
        call = _Call(state, request, operation, span)
        if call.recording:
            span.set_attributes({
                "http.request.method": request.method,
                "http.route": route,
                "url.path": request.path,
                "url.scheme": "http",
            })
        try:
            response = await body(call)
        except ApiError as exc:
            if exc.reject_reason and state.metrics is not None:
                state.metrics.reject(exc.reject_reason)
            response = exc.response()
        except asyncio.CancelledError:
            if call.recording:
                span.set_attribute("error.type", "cancelled")
            raise
        except Exception as exc:
            mapped = map_exception(exc, state.config.server.retry_after_s)
            if call.recording:
                span.record_exception(exc)
            response = mapped.response()
        if call.recording:
            if response.status >= 500:
                span.set_status(Status(StatusCode.ERROR))
                span.set_attributes({"http.response.status_code": response.status, "error.type": str(response.status)})
            else:
                span.set_attribute("http.response.status_code", response.status)
        return response


# --------------------------------------------------------------------------------------------------------------
# /v1 handlers


def _sampling(body: Any, max_new_tokens: int) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=body.temperature if body.temperature is not None else 1.0,  # OpenAI's default
        top_p=body.top_p if body.top_p is not None else 1.0,
        stop=body.stops(),
        seed=body.seed,
    )


async def completions(request: web.Request) -> web.StreamResponse:
    return await _traced(request, "text_completion", _completions)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _traced(request, "chat", _chat)


async def embeddings(request: web.Request) -> web.StreamResponse:
    return await _traced(request, "embeddings", _embeddings)


async def run_workflow(request: web.Request) -> web.StreamResponse:
    return await _traced(request, "workflow", _workflow)


async def _completions(call: _Call) -> web.StreamResponse:
    body: CompletionRequest = await call.parse(CompletionRequest)
    model = call.resolve(body.model, "generate")
    sampling = _sampling(body, body.max_new_tokens())
    request_id = new_id("cmpl")
    prompts = body.prompts()
    if not prompts:
        raise err.invalid_field("prompt", "prompt: give at least one prompt")
    requests = [
        GenerationRequest(prompt, sampling, f"{request_id}-{i}", body.conversation_id)
        for prompt in prompts for i in range(body.n)
    ]
    if body.stream:
        if len(requests) != 1:
            raise err.invalid_field("stream", "stream: streaming takes one prompt and n = 1")
        return await _stream(call, model, requests[0], request_id, "text_completion", body.include_usage,
                             echo_prompt=prompts[0] if body.echo else None)
    async with call.admitted(model):
        results = await _generate_all(call, model, requests, body.n)
    choices = []
    for index, result in enumerate(results):
        text = (prompts[index // body.n] + result.text) if body.echo else result.text
        choices.append({"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason(result.finish_reason)})
    return web.json_response({
        "id": request_id, "object": "text_completion", "created": now_s(), "model": model, "choices": choices,
        "usage": usage(call.prompt_tokens, call.completion_tokens),
    })


async def _chat(call: _Call) -> web.StreamResponse:
    body: ChatCompletionRequest = await call.parse(ChatCompletionRequest)
    model = call.resolve(body.model, "generate")
    sampling = _sampling(body, body.max_new_tokens())
    request_id = new_id("chatcmpl")
    prompt = render_chat(list(body.messages))
    requests = [GenerationRequest(prompt, sampling, f"{request_id}-{i}", body.conversation_id) for i in range(body.n)]
    if body.stream:
        if body.n != 1:
            raise err.invalid_field("n", "n: streaming takes n = 1")
        return await _stream(call, model, requests[0], request_id, "chat", body.include_usage)
    async with call.admitted(model):
        results = await _generate_all(call, model, requests, body.n)
    choices = [
        {"index": i, "message": {"role": "assistant", "content": r.text}, "logprobs": None,
         "finish_reason": finish_reason(r.finish_reason)}
        for i, r in enumerate(results)
    ]
    return web.json_response({
        "id": request_id, "object": "chat.completion", "created": now_s(), "model": model, "choices": choices,
        "usage": usage(call.prompt_tokens, call.completion_tokens),
    })


async def _generate_all(call: _Call, model: str, requests: list[GenerationRequest], n: int) -> list[GenerationResult]:
    manager = call.state.manager
    if len(requests) == 1:
        results = [await manager.generate(model, requests[0])]
    else:
        tasks = [asyncio.ensure_future(manager.generate(model, r)) for r in requests]
        try:
            results = list(await asyncio.gather(*tasks))
        except BaseException:
            # gather leaves the other choices running after the first error; their answer has nowhere to go.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
    for i, result in enumerate(results):
        if result.error is not None:
            raise result.error
        # OpenAI counts a prompt once however many choices (n) it has.
        call.result(result.prompt_tokens if i % n == 0 else 0, result.completion_tokens, result.finish_reason)
    return results


async def _stream(
    call: _Call,
    model: str,
    gen_request: GenerationRequest,
    request_id: str,
    kind: str,
    include_usage: bool,
    *,
    echo_prompt: str | None = None,
) -> web.StreamResponse:
    """Server-sent events: ``data: {chunk}\\n\\n`` ... ``data: [DONE]\\n\\n``.

    Headers go out with the first chunk, so a failure before it is an ordinary JSON error with its status; a
    failure after it is an ``error`` event followed by ``[DONE]``.
    """
    request = call.request
    created = now_s()
    response: web.StreamResponse | None = None
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def chunk(text: str | None, finish: str | None, *, first: bool = False) -> dict[str, Any]:
        if kind == "chat":
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return {"id": request_id, "object": obj, "created": created, "model": model, "choices": [choice]}

    async def send(payload: dict[str, Any] | str) -> None:
        data = payload if isinstance(payload, str) else _dumps(payload)
        await response.write(f"data: {data}\n\n".encode())

    client_gone = False
    try:
        async with call.admitted(model):
            stream = call.state.manager.generate_stream(model, gen_request)
            try:
                last_prompt = last_completion = 0
                async for piece in stream:
                    call.first_token()
                    if response is None:
                        response = web.StreamResponse(headers=SSE_HEADERS)
                        await response.prepare(request)
                        first_text = echo_prompt if echo_prompt is not None else ("" if kind == "chat" else None)
                        if kind == "chat" or first_text:
                            await send(chunk(first_text, None, first=True))
                    last_prompt = piece.prompt_tokens or last_prompt
                    last_completion = piece.completion_tokens or last_completion
                    if piece.text:
                        await send(chunk(piece.text, None))
                    if piece.finish_reason is not None:
                        await send(chunk(None if kind == "chat" else "", finish_reason(piece.finish_reason)))
                        call.finish_reasons.append(piece.finish_reason)
                call.prompt_tokens, call.completion_tokens = last_prompt, last_completion
            except (ConnectionResetError, ConnectionError):
                client_gone = True
                raise asyncio.CancelledError from None
            finally:
                aclose = getattr(stream, "aclose", None)
                if aclose is not None:
                    try:
                        await aclose()
                    except Exception:
                        pass
    except asyncio.CancelledError:
        if not client_gone:
            raise
        return response or web.Response(status=499)
    except ApiError as exc:
        if response is None:
            raise
        if call.recording:
            call.span.set_attribute("error.type", exc.code or str(exc.status))
            call.span.set_status(Status(StatusCode.ERROR, exc.message))
        try:
            await send({"error": {"message": exc.message, "type": exc.type, "code": exc.code, "param": exc.param}})
            await send("[DONE]")
        except (ConnectionResetError, ConnectionError):
            pass
        return response
    if response is None:  # a stream that produced nothing at all
        response = web.StreamResponse(headers=SSE_HEADERS)
        await response.prepare(request)
        await send(chunk(None if kind == "chat" else "", "stop"))
    try:
        if include_usage:
            await send({"id": request_id, "object": obj, "created": created, "model": model, "choices": [],
                        "usage": usage(call.prompt_tokens, call.completion_tokens)})
        await send("[DONE]")
        await response.write_eof()
    except (ConnectionResetError, ConnectionError):
        pass
    return response


async def _embeddings(call: _Call) -> web.StreamResponse:
    body: EmbeddingRequest = await call.parse(EmbeddingRequest)
    model = call.resolve(body.model, "embed")
    texts = body.texts()
    if not texts:
        raise err.invalid_field("input", "input: give at least one text")
    if body.dimensions is not None:
        raise err.invalid_field("dimensions", "dimensions: this server returns the model's own dimensions; omit it")
    async with call.admitted(model):
        results = await call.state.manager.embed(model, texts)
        for result in results:
            if result.error is not None:
                raise result.error
        call.result(sum(r.prompt_tokens for r in results), 0, None)
    data = [
        {"object": "embedding", "index": i, "embedding": encode_embedding(r.vector, body.encoding_format)}
        for i, r in enumerate(results)
    ]
    return web.json_response({
        "object": "list", "data": data, "model": model,
        "usage": {"prompt_tokens": call.prompt_tokens, "total_tokens": call.prompt_tokens},
    })


def _workflows(state: ServerState) -> dict[str, Any]:
    if state.workflows is None:
        try:
            from orchestrator.workflows import default_workflows
        except ImportError:
            state.workflows = {}
        else:
            state.workflows = default_workflows(state.manager)
    return state.workflows


async def _workflow(call: _Call) -> web.StreamResponse:
    state = call.state
    name = call.request.match_info["name"]
    workflows = _workflows(state)
    workflow = workflows.get(name)
    if workflow is None:
        raise ApiError(404, f"workflow {name!r} does not exist; workflows: {', '.join(sorted(workflows)) or 'none'}",
                       code="workflow_not_found", reject_reason="unknown_model")
    body: WorkflowRequest = await call.parse(WorkflowRequest)
    parameters = dict(body.parameters)
    try:
        # Checked before admission so that a bad request costs no queue slot; run() checks again.
        normalised = workflow.validate_parameters(parameters)
        models = list(workflow.get_required_models(normalised))
    except WorkflowValidationError as exc:
        raise err.invalid_field("parameters", f"parameters: {exc}") from None
    call.model = name
    if call.recording:
        call.span.set_attribute("muai.workflow", name)
        if models:
            call.span.set_attribute("muai.workflow.models", models)
    async with call.admitted(f"workflow:{name}"):
        result = await workflow.run(parameters)
        if result.status == "failed":
            _raise_workflow_failure(call, name, result)
            call.status = "error"
        else:
            usage_doc = (result.result or {}).get("usage") if isinstance(result.result, dict) else None
            if isinstance(usage_doc, dict):
                call.result(int(usage_doc.get("prompt_tokens", 0)), int(usage_doc.get("completion_tokens", 0)), None)
            else:
                call.state.admission.progress()
    payload = {
        "workflow": name,
        "status": result.status,
        "result": _jsonable(result.result),
        "metadata": _jsonable(result.metadata or {}),
        "error": result.error,
        "execution_time": result.execution_time,
    }
    if result.status == "failed":
        if call.recording:
            call.span.set_attribute("error.type", "workflow_failed")
        return web.json_response(payload, status=500)
    return web.json_response(payload)


def _raise_workflow_failure(call: _Call, name: str, result: Any) -> None:
    """A failed step whose error has a status of its own (a bad request, a model not ready, draining) answers with
    it, as the same error would outside a workflow; an engine error or a bug stays a 500 ``workflow_failed``."""
    cause = getattr(result, "exception", None)
    if isinstance(cause, EngineError):
        call.state.admission.progress()  # the engine answered, if with an error
    if cause is None:
        return
    mapped = map_exception(cause, call.state.config.server.retry_after_s)
    if mapped.status == 500:
        return
    # Admitted already: not a rejection, so no reject_reason.
    raise ApiError(mapped.status, f"workflow {name!r}: {result.error or mapped.message}", type_=mapped.type,
                   code=mapped.code, param=mapped.param, headers=mapped.headers)


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "vector") and hasattr(value, "prompt_tokens"):
        return {"embedding": list(value.vector), "prompt_tokens": value.prompt_tokens}
    if hasattr(value, "text") and hasattr(value, "completion_tokens"):
        return {"text": value.text, "prompt_tokens": value.prompt_tokens,
                "completion_tokens": value.completion_tokens, "finish_reason": getattr(value, "finish_reason", None)}
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    return str(value)


def _model_entry(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "muai"}


async def list_models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.json_response({"object": "list", "data": [_model_entry(m) for m in state.manager.models()]})


async def get_model(request: web.Request) -> web.Response:
    state = request.app[STATE]
    name = request.match_info["model"]
    models = state.manager.models()
    if name not in models:
        raise err.unknown_model(name, models)
    return web.json_response(_model_entry(name))


# --------------------------------------------------------------------------------------------------------------
# Health and metrics


async def live(request: web.Request) -> web.Response:
    return web.json_response({"status": "alive"})


def readiness(state: ServerState):
    """The current :class:`~orchestrator.health.Readiness` of ``state``."""
    status = _refresh_status(state)
    return evaluate_readiness(
        models=[ModelRequirement(m.name, m.required, m.preload) for m in state.config.models],
        manager_status=status if isinstance(status, dict) else {},
        admission=state.admission.snapshot(),
        stuck_after_s=state.config.server.stuck_after_s,
        preload_pending=state.preload_pending,
        problems=state.health.problems(),
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


# --------------------------------------------------------------------------------------------------------------
# Admin API


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


def _is_critical_key(config: Any, key: str) -> bool:
    """True when ``key`` names an existing configuration key that cannot change at runtime."""
    if not key:
        return False
    path = key.split(".")
    owner: Any = type(config)
    if path[0] == "models" and len(path) == 3 and config.models:
        owner, path = type(config.models[0]), path[2:]
    for part in path[:-1]:
        info = getattr(owner, "model_fields", {}).get(part)
        if info is None or not (isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel)):
            return False
        owner = info.annotation
    info = getattr(owner, "model_fields", {}).get(path[-1])
    if info is None:
        return False
    extra = info.json_schema_extra
    return not (isinstance(extra, dict) and extra.get("runtime"))


async def _read_object(request: web.Request, limit: int) -> dict[str, Any]:
    import json

    if request.content_length is not None and request.content_length > limit:
        raise err.too_large(limit)
    raw = await request.read()
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise err.bad_json(f"request body is not valid JSON: {exc}") from None
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
        if _is_critical_key(state.config, key):
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
    state.limits.clear()
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
    status = _refresh_status(state)
    return web.json_response({"model": name, "status": (status.get("models") or {}).get(name, {})})


async def admin_unload_model(request: web.Request) -> web.Response:
    state = _authorise(request)
    name = request.match_info["name"]
    if name not in state.manager.models():
        raise err.unknown_model(name, state.manager.models())
    # The async unload lets a running batch finish and keeps the engine shutdown off the event loop.
    unloaded = await state.manager.aunload_model(name)
    state.engines.pop(name, None)
    return web.json_response({"model": name, "unloaded": bool(unloaded)})


async def admin_end_conversation(request: web.Request) -> web.Response:
    state = _authorise(request)
    cid = request.match_info["id"]
    released = state.manager.end_conversation(cid)
    if inspect.isawaitable(released):
        released = await released
    return web.json_response({"conversation_id": cid, "released": bool(released)})


def _dumps(payload: Any) -> str:
    import json

    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False)


# --------------------------------------------------------------------------------------------------------------
# serve()


MIN_SHUTDOWN_GRACE_S = 1.0
"""Least time open connections get to finish once the listener closes (a response being written, a health check)."""


def shutdown_grace(deadline: float | None, now: float, *, hurried: bool) -> float:
    """How long open connections may take to finish after the drain: what is left of ``server.drain_timeout_s``,
    at least :data:`MIN_SHUTDOWN_GRACE_S`, and only that minimum after a second signal. Pure.

    Without it aiohttp waits up to its ``shutdown_timeout`` per connection on top of the drain, twice (once for
    the handler, once more after cancelling it), so shutdown could take three times the drain timeout."""
    if hurried or deadline is None:
        return MIN_SHUTDOWN_GRACE_S
    return max(MIN_SHUTDOWN_GRACE_S, deadline - now)


async def _close_connections(runner: web.AppRunner, grace: float, hurry: asyncio.Event) -> None:
    """Stop listening, then let open connections finish within ``grace`` seconds before their handlers are
    cancelled; a (further) signal setting ``hurry`` ends the wait at once. ``runner.cleanup()`` then finds them
    closed, or cancels what is left within its own ``shutdown_timeout``."""
    for site in list(runner.sites):
        await site.stop()
    server = runner.server
    if server is None:
        return
    await asyncio.sleep(0)  # let requests that arrived just before the listener closed start (as cleanup() does)
    pre_shutdown = getattr(server, "pre_shutdown", None)  # aiohttp >= 3.10
    if pre_shutdown is not None:
        pre_shutdown()  # idle keep-alive connections close now instead of holding the wait
    closing = asyncio.create_task(server.shutdown(grace))
    if hurry.is_set():  # hurried during the drain already: the minimum grace, no more waiting to cut short
        await closing
        return
    hurried = asyncio.create_task(hurry.wait())
    try:
        await asyncio.wait({closing, hurried}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        hurried.cancel()
    if not closing.done():
        log.warning("second signal: cancelling the requests still open instead of waiting for them")
        closing.cancel()
        await asyncio.gather(closing, return_exceptions=True)


def serve(config: Any, *, update_config: UpdateConfig | None = None) -> int:
    """Run the server until SIGTERM/SIGINT, drain, and return the exit status (0 after a clean drain)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(_serve(config, update_config))


async def _serve(config: Any, update_config: UpdateConfig | None) -> int:
    server_cfg = config.server
    app = create_app(config, update_config=update_config)
    state = app[STATE]
    # handler_cancellation: a client that disconnects has its handler cancelled, so its request leaves the queue
    # or its batch (aiohttp's default is to let it run on; its TestServer cancels, so tests alone would not show
    # it). shutdown_timeout is the last resort for connections _close_connections could not finish.
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=MIN_SHUTDOWN_GRACE_S)
    await runner.setup()
    site = web.TCPSite(runner, server_cfg.host, server_cfg.port)
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
    log.info("serving on http://%s:%d", server_cfg.host, server_cfg.port)
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
        await _close_connections(runner, grace, hurry)
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
