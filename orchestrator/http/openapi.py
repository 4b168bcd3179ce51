"""The orchestrator's HTTP API as an OpenAPI 3.1 document, served at ``GET /openapi.json``.

Request bodies are described by the same pydantic models the handlers validate with (``schemas``); the answers by
the models below, which say what the handlers build (the handlers build plain dicts: a pydantic round trip per
response would cost the request path for nothing a client sees). The document describes the server that serves
it: the admin routes appear only where the admin API is on, and ``/metrics`` at its configured path when it is
served on the main port. ``tests/orchestrator/test_openapi.py`` checks that the routes and the document agree both
ways and runs schemathesis against a live server with every answer held against its schema.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from orchestrator.http.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    CordonRequest,
    EmbeddingRequest,
    WorkflowRequest,
)

OPENAPI_VERSION = "3.1.0"
OPENAPI_PATH = "/openapi.json"
JSON = "application/json"
OPENAPI: web.AppKey[dict[str, Any]] = web.AppKey("openapi", dict)


class _Answer(BaseModel):
    # Closed: a field the handlers add without saying so here fails the contract test.
    model_config = ConfigDict(extra="forbid")


class ErrorDetail(_Answer):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, rate_limit_error, server_error, "
                                  "service_unavailable or timeout_error")
    code: str | None
    param: str | None = Field(description="The request field at fault (`messages[0].content`), where one is.")


class ErrorResponse(_Answer):
    """Every error, whatever the route: OpenAI's shape."""

    error: ErrorDetail


class Usage(_Answer):
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    total_tokens: int = Field(ge=0)


class CompletionChoice(_Answer):
    index: int = Field(ge=0)
    text: str
    logprobs: None
    finish_reason: Literal["stop", "length"] | None


class CompletionResponse(_Answer):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(_Answer):
    role: Literal["assistant"]
    content: str


class ChatChoice(_Answer):
    index: int = Field(ge=0)
    message: AssistantMessage
    logprobs: None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletionResponse(_Answer):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChunkChoice(_Answer):
    index: int = Field(ge=0)
    text: str
    logprobs: None
    finish_reason: Literal["stop", "length"] | None


class CompletionChunk(_Answer):
    """One event of a streamed completion; with ``stream_options.include_usage`` a last one has no choices and
    the ``usage``."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None


class ChatDelta(_Answer):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_Answer):
    index: int = Field(ge=0)
    delta: ChatDelta
    logprobs: None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletionChunk(_Answer):
    """One event of a streamed chat completion (the first carries ``delta.role``)."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class Embedding(_Answer):
    object: Literal["embedding"]
    index: int = Field(ge=0)
    embedding: list[float] | str = Field(description="Floats, or little-endian float32 in base64 "
                                                     "(`encoding_format: base64`).")


class EmbeddingUsage(_Answer):
    prompt_tokens: int = Field(ge=0)
    total_tokens: int = Field(ge=0)


class EmbeddingResponse(_Answer):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class Model(_Answer):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(_Answer):
    object: Literal["list"]
    data: list[Model]


class WorkflowResponse(_Answer):
    """A finished workflow (200), or one whose step failed inside an engine (500, ``status: failed``)."""

    workflow: str
    status: str
    result: Any = Field(description="What the workflow returns; its shape is the workflow's own.")
    metadata: dict[str, Any]
    error: str | None
    execution_time: float


class Liveness(_Answer):
    status: Literal["alive"]


class Readiness(BaseModel):
    """200 when ready (``ready``/``degraded``), 503 with ``Retry-After`` otherwise; ``reasons`` say why not."""

    status: Literal["ready", "degraded", "unavailable", "draining"]
    ready: bool
    reasons: list[str]
    degraded: list[str]
    models: dict[str, dict[str, Any]]
    engines: dict[str, dict[str, Any]]
    requests: dict[str, float]


class AdminConfig(_Answer):
    config: dict[str, Any] = Field(description="The running configuration, secrets as `***`.")


class AdminConfigChanged(_Answer):
    changed: list[str] = Field(description="The keys the patch changed (dotted).")
    config: dict[str, Any]


class AdminModelLoaded(_Answer):
    model: str
    status: dict[str, Any]


class AdminModelUnloaded(_Answer):
    model: str
    unloaded: bool


class AdminConversationEnded(_Answer):
    conversation_id: str
    released: bool = Field(description="Whether a cached conversation was there to release.")


class DeviceInfo(_Answer):
    id: str = Field(description="`cuda:N`, or `cpu` on a machine without GPUs.")
    kind: Literal["cpu", "cuda"]
    name: str
    total_bytes: int
    free_bytes: int = Field(description="Free memory when the server started.")
    schedulable: bool = Field(description="False while cordoned: no new placement.")
    cordoned_by: Literal["operator", "fault"] | None
    reason: str | None
    cordoned_for_s: float | None
    reprobe_in_s: float | None = Field(description="When a fault cordon lifts for a re-probe; null for an operator's.")
    faults: int = Field(description="Device faults engines met here since start.")


class PlacedDevice(DeviceInfo):
    models: list[str] = Field(description="Models the placement planner put a replica of here.")


class DeviceList(_Answer):
    devices: list[PlacedDevice]


class DeviceAnswer(_Answer):
    device: DeviceInfo


class ConfigPatch(BaseModel):
    """A partial configuration: nested objects of the keys to change (``{"server": {"queue_capacity": 64}}``);
    only runtime keys (docs/configuration.md marks them) may change without a restart (409 otherwise)."""

    model_config = ConfigDict(extra="allow")


_ERRORS = {
    400: "Malformed JSON, a body that is not an object, nested too deeply, or a request the model cannot serve.",
    401: "Missing or wrong bearer token.",
    404: "Unknown model, workflow or route.",
    409: "A configuration key that needs a restart.",
    413: "Body over `server.max_body_bytes` (as sent, or inflated).",
    415: "A `Content-Encoding` other than gzip.",
    422: "A missing or wrongly typed field, named in `param`.",
    429: "The queue is full; retry after `Retry-After` seconds.",
    500: "An engine error or a bug (logged with its trace; the answer carries none).",
    501: "Not available in this server (no config updater, no device inventory).",
    503: "Draining, or the model is not loaded; retry after `Retry-After` seconds.",
    504: "`server.request_timeout_s` passed.",
}
_RETRY_AFTER = {429, 503}
_INFERENCE_ERRORS = (400, 404, 413, 415, 422, 429, 500, 503, 504)
_ADMIN_ERRORS = (401, 404, 500)


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    """OpenAPI's form: ``/v1/models/{model}``."""
    operation_id: str
    summary: str
    tag: str
    answer: type[BaseModel] | None
    """The 200 JSON body; None for a non-JSON answer (``text``)."""
    errors: tuple[int, ...] = ()
    body: type[BaseModel] | None = None
    chunk: type[BaseModel] | None = None
    """With ``stream: true`` the 200 is ``text/event-stream``, each event's data one of these (or ``[DONE]``)."""
    text: str | None = None
    """The media type of a non-JSON 200."""
    admin: bool = False
    body_optional: bool = False
    error_answer: dict[int, type[BaseModel]] | None = None
    """Statuses whose body is not the error shape (readiness' 503, a failed workflow's 500)."""


def _operations(metrics_path: str | None, admin: bool) -> list[Operation]:
    ops = [
        Operation("post", "/v1/completions", "createCompletion", "Text completion (OpenAI).", "openai",
                  CompletionResponse, _INFERENCE_ERRORS, CompletionRequest, chunk=CompletionChunk),
        Operation("post", "/v1/chat/completions", "createChatCompletion", "Chat completion (OpenAI).", "openai",
                  ChatCompletionResponse, _INFERENCE_ERRORS, ChatCompletionRequest, chunk=ChatCompletionChunk),
        Operation("post", "/v1/embeddings", "createEmbedding", "Embeddings (OpenAI).", "openai", EmbeddingResponse,
                  _INFERENCE_ERRORS, EmbeddingRequest),
        Operation("get", "/v1/models", "listModels", "The configured models.", "openai", ModelList),
        Operation("get", "/v1/models/{model}", "retrieveModel", "One model.", "openai", Model, (404,)),
        Operation("post", "/v1/workflows/{name}", "runWorkflow", "Run a named multi-model workflow as one request.",
                  "workflows", WorkflowResponse, _INFERENCE_ERRORS, WorkflowRequest,
                  error_answer={500: WorkflowResponse}),
        Operation("get", "/health/live", "live", "Liveness: the process answers.", "health", Liveness),
        Operation("get", "/health/ready", "ready", "Readiness, its reasons, degradation and queue.", "health",
                  Readiness, (503,), error_answer={503: Readiness}),
        Operation("get", OPENAPI_PATH, "openapi", "This document.", "meta", None, text=JSON),
    ]
    if metrics_path is not None:
        ops.append(Operation("get", metrics_path, "metrics", "Prometheus metrics (OpenMetrics when asked).", "meta",
                             None, (500,), text="text/plain"))
    if admin:
        ops += [
            Operation("get", "/admin/config", "getConfig", "The running configuration.", "admin", AdminConfig,
                      _ADMIN_ERRORS, admin=True),
            Operation("patch", "/admin/config", "patchConfig", "Change runtime configuration keys.", "admin",
                      AdminConfigChanged, (400, 401, 409, 413, 415, 422, 500, 501), ConfigPatch, admin=True),
            Operation("post", "/admin/models/{name}/load", "loadModel", "Load a model now.", "admin",
                      AdminModelLoaded, _ADMIN_ERRORS, admin=True),
            Operation("post", "/admin/models/{name}/unload", "unloadModel", "Unload a model (running work finishes).",
                      "admin", AdminModelUnloaded, _ADMIN_ERRORS, admin=True),
            Operation("delete", "/admin/conversations/{id}", "endConversation", "Release a conversation's KV cache.",
                      "admin", AdminConversationEnded, _ADMIN_ERRORS, admin=True),
            Operation("get", "/admin/devices", "listDevices", "The devices, their memory and cordons.", "admin",
                      DeviceList, (401, 501), admin=True),
            Operation("post", "/admin/devices/{id}/cordon", "cordonDevice",
                      "Take a device out of new placements (readiness shows it degraded).", "admin", DeviceAnswer,
                      (400, 401, 413, 415, 422, 501), CordonRequest, admin=True, body_optional=True),
            Operation("post", "/admin/devices/{id}/uncordon", "uncordonDevice", "Let a device take work again.",
                      "admin", DeviceAnswer, (401, 501), admin=True),
        ]
    return ops


def _schema_ref(model: type[BaseModel], components: dict[str, Any]) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, definition in schema.pop("$defs", {}).items():
        components.setdefault(name, definition)
    components.setdefault(model.__name__, schema)
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _event_schema(chunk: type[BaseModel], components: dict[str, Any]) -> dict[str, Any]:
    # The schema of one server-sent event (as OpenAPI 3.1 tools read a text/event-stream schema): its data is a
    # chunk, an error that ends the stream early (the status was sent with the first chunk), or the last `[DONE]`.
    payload = {"anyOf": [_schema_ref(chunk, components), _schema_ref(ErrorResponse, components)]}
    return {
        "type": "object", "required": ["data"],
        "description": "One server-sent event: `data: <chunk JSON>`; the stream ends with `data: [DONE]`.",
        "properties": {
            "event": {"type": "string"},
            "data": {"anyOf": [{"const": "[DONE]"},
                               {"type": "string", "contentMediaType": JSON, "contentSchema": payload}]},
        },
    }


def _path_parameters(path: str) -> list[dict[str, Any]]:
    names = [part[1:-1] for part in path.split("/") if part.startswith("{") and part.endswith("}")]
    return [{"name": n, "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}} for n in names]


def _operation(op: Operation, components: dict[str, Any]) -> dict[str, Any]:
    ok: dict[str, Any] = {"description": "OK"}
    if op.answer is not None:
        ok["content"] = {JSON: {"schema": _schema_ref(op.answer, components)}}
        if op.chunk is not None:
            ok["content"]["text/event-stream"] = {"schema": _event_schema(op.chunk, components)}
    else:
        ok["content"] = {op.text: {"schema": {"type": "object"} if op.text == JSON else {"type": "string"}}}
    responses: dict[str, Any] = {"200": ok}
    special = op.error_answer or {}
    # A path parameter can always name something that does not exist.
    statuses = set(op.errors) | ({404} if "{" in op.path else set())
    for status in sorted(statuses):
        body = special.get(status, ErrorResponse)
        answer: dict[str, Any] = {"description": _ERRORS[status], "content": {JSON: {"schema": _schema_ref(body, components)}}}
        if status in _RETRY_AFTER:
            answer["headers"] = {"Retry-After": {"required": True, "schema": {"type": "string", "pattern": "^[0-9]+$"},
                                                 "description": "Seconds to wait before retrying."}}
        responses[str(status)] = answer
    out: dict[str, Any] = {"operationId": op.operation_id, "summary": op.summary, "tags": [op.tag],
                           "responses": responses}
    parameters = _path_parameters(op.path)
    if parameters:
        out["parameters"] = parameters
    if op.body is not None:
        out["requestBody"] = {"required": not op.body_optional,
                              "content": {JSON: {"schema": _schema_ref(op.body, components)}}}
    if op.admin:
        out["security"] = [{"adminToken": []}]
    return out


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("muai")
    except PackageNotFoundError:
        return "unknown"


def openapi_document(*, metrics_path: str | None, admin: bool) -> dict[str, Any]:
    """The document for a server with ``/metrics`` at ``metrics_path`` (None: not on this port) and the admin API
    on or off."""
    components: dict[str, Any] = {}
    paths: dict[str, dict[str, Any]] = {}
    for op in _operations(metrics_path, admin):
        paths.setdefault(op.path, {})[op.method] = _operation(op, components)
    doc: dict[str, Any] = {
        "openapi": OPENAPI_VERSION,
        "info": {"title": "MuAI orchestrator", "version": _version(),
                 "description": "OpenAI-compatible inference, workflows, health and the admin API. Every error has "
                                "one shape: `{\"error\": {\"message\", \"type\", \"code\", \"param\"}}`."},
        "paths": paths,
        "components": {"schemas": dict(sorted(components.items()))},
    }
    if admin:
        doc["components"]["securitySchemes"] = {"adminToken": {
            "type": "http", "scheme": "bearer", "description": "`server.admin_token`."}}
    return doc


async def openapi_endpoint(request: web.Request) -> web.Response:
    return web.json_response(request.app[OPENAPI])


def operations(*, metrics_path: str | None, admin: bool) -> list[tuple[str, str]]:
    """``(method, path)`` of every documented operation, for the route agreement test."""
    return [(op.method, op.path) for op in _operations(metrics_path, admin)]


__all__ = ["OPENAPI", "OPENAPI_PATH", "ErrorResponse", "openapi_document", "openapi_endpoint", "operations"]
