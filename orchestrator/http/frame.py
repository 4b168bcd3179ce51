"""The per-request frame every ``/v1`` route runs in: the root span (continuing an incoming ``traceparent``),
body parsing with size caps, model resolution, admission and its timeout, the metrics observed once per request,
and the mapping of errors to HTTP answers."""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError
from opentelemetry.trace import SpanKind, Status, StatusCode
from pydantic import BaseModel, ValidationError

from adapters.base import (
    EngineError,
    EngineUnavailableError,
    InvalidRequestError,
    SamplingParams,
)
from orchestrator.admission import DRAINING, AdmissionRejected, Ticket
from orchestrator.errors import (
    BatcherClosedError,
    ModelLoadFailedError,
    ModelNotReadyError,
    MuaiError,
    UnknownModelError,
    WorkflowValidationError,
)
from orchestrator.http import errors as err
from orchestrator.http.errors import ApiError
from orchestrator.metrics import ModelMetrics
from orchestrator.state import STATE, ServerState
from orchestrator.tracing import extract_context

log = logging.getLogger("orchestrator.server")  # one logger name for the whole server, as before the split


async def read_body(request: web.Request, limit: int) -> bytes:
    """The body, at most ``limit`` bytes (413 beyond, compressed or inflated). ``Content-Encoding: gzip`` is
    inflated here, bounded (``serve`` runs aiohttp with its own inflation off: a broken stream raised from inside
    aiohttp's reader was a 500 and a logged traceback); any other encoding is a 415."""
    if request.content_length is not None and request.content_length > limit:
        raise err.too_large(limit)
    encoding = (request.headers.get("Content-Encoding") or "identity").strip().lower()
    if encoding not in ("identity", "gzip"):
        raise ApiError(415, f"unsupported Content-Encoding {encoding!r}: send gzip or none", code="unsupported_encoding",
                       reject_reason="invalid")
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise err.too_large(limit) from None
    except RequestPayloadError as exc:  # a server that inflates itself (aiohttp's default, as tests run it)
        raise _unreadable(str(exc.__cause__ or exc)) from None
    # gzip's magic number cannot start JSON: without it, the body was inflated already (auto_decompress on).
    if encoding == "gzip" and body[:2] == b"\x1f\x8b":
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            body = inflater.decompress(body, limit + 1)
        except zlib.error as exc:
            raise _unreadable(f"not valid gzip: {exc}") from None
        if len(body) > limit:
            raise err.too_large(limit)
        if not inflater.eof:
            raise _unreadable("the gzip stream is truncated")
    return body


def _unreadable(why: str) -> ApiError:
    return ApiError(400, f"request body could not be read: {why}", code="invalid_body", reject_reason="invalid")


class Call:
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
        body = await read_body(self.request, state.config.server.max_body_bytes)
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
            raise err.queue_full(str(exc), server.retry_after_s, reason=exc.reason) from None
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
                trace_id = f"{self.span.get_span_context().trace_id:032x}" if self.recording else None
                bound.observe(e2e_s=e2e, queue_s=self.queue_s, prompt_tokens=self.prompt_tokens,
                              completion_tokens=self.completion_tokens, ttft_s=ttft, tpot_s=tpot, trace_id=trace_id)
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


async def traced(request: web.Request, operation: str, body: Callable[[Call], Any]) -> web.StreamResponse:
    """Run ``body`` inside the request's root span (SERVER, continuing an incoming ``traceparent``)."""
    state = request.app[STATE]
    tracing = state.tracing
    parent = extract_context(request.headers) if tracing.enabled else None
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else request.path
    with tracing.tracer.start_as_current_span(
        f"{request.method} {route}", context=parent, kind=SpanKind.SERVER,
        record_exception=False, set_status_on_exception=False,
    ) as span:
        call = Call(state, request, operation, span)
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


def sampling_params(body: Any, max_new_tokens: int) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=body.temperature if body.temperature is not None else 1.0,  # OpenAI's default
        top_p=body.top_p if body.top_p is not None else 1.0,
        stop=body.stops(),
        seed=body.seed,
        ignore_eos=body.ignore_eos,
    )


def jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "vector") and hasattr(value, "prompt_tokens"):
        return {"embedding": list(value.vector), "prompt_tokens": value.prompt_tokens}
    if hasattr(value, "text") and hasattr(value, "completion_tokens"):
        return {"text": value.text, "prompt_tokens": value.prompt_tokens,
                "completion_tokens": value.completion_tokens, "finish_reason": getattr(value, "finish_reason", None)}
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    return str(value)


def dumps(payload: Any) -> str:
    import json

    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False)


__all__ = [
    "Call",
    "dumps",
    "jsonable",
    "map_exception",
    "sampling_params",
    "traced",
]
