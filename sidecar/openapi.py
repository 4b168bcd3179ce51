"""The sidecar's HTTP API as an OpenAPI 3.1 document, served at ``GET /openapi.json``.

The query API's answers are described by the models below (the handlers build plain dicts; the contract test in
``tests/sidecar/test_sidecar_openapi.py`` holds every answer of a live sidecar against them, and runs schemathesis
over every operation). ``POST /v1/traces`` is OTLP/HTTP, which OpenTelemetry specifies (its bodies are
``ExportTraceServiceRequest`` and ``...Response`` in protobuf or OTLP/JSON): the document names the media types
and the statuses, not the protobuf schema. Nested figures whose keys follow the configuration (windows) or the
machine (GPUs, sinks) are typed one level deep; docs/sidecar-api.md describes them.
"""

from __future__ import annotations

from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

OPENAPI_VERSION = "3.1.0"
OPENAPI_PATH = "/openapi.json"
JSON = "application/json"
PROTOBUF = "application/x-protobuf"
OPENAPI: web.AppKey[dict[str, Any]] = web.AppKey("sidecar_openapi", dict)


class _Answer(BaseModel):
    # Closed: a key a handler adds without saying so here fails the contract test.
    model_config = ConfigDict(extra="forbid")


class ErrorDetail(BaseModel):
    """Some errors add what would have been valid (``windows``, ``scopes``, ``allowed``) or the bad ``key``."""

    model_config = ConfigDict(extra="allow")
    code: int = Field(description="The HTTP status again.")
    message: str


class ErrorResponse(_Answer):
    error: ErrorDetail


class Distribution(_Answer):
    mean: float | None
    min: float | None
    max: float | None
    p50: float | None
    p95: float | None
    p99: float | None


class Totals(_Answer):
    requests: float
    errors: float


class Sampling(_Answer):
    spans: int
    effective_samples: float
    rank_error: float | None


class SeriesStats(_Answer):
    model: str
    operation: str
    scope: Literal["request", "inference"]
    window: str
    window_s: float
    requests: float
    throughput_rps: float
    errors: float
    error_ratio: float | None
    latency_s: Distribution
    ttft_s: Distribution | None
    input_tokens_per_s: float
    output_tokens_per_s: float
    error_bound: float
    totals: Totals
    sampling: Sampling | None


class StatsResponse(_Answer):
    time: str | None
    windows: dict[str, float] = Field(description="Window name to its horizon in seconds.")
    stats: list[SeriesStats]


class GpusResponse(_Answer):
    available: bool
    reason: str | None
    driver_version: str | None
    count: int
    sampled_at: str | None
    gpus: list[dict[str, Any]]


class HostResponse(_Answer):
    enabled: bool
    sampled_at: str | None
    host: dict[str, Any] | None
    windows: dict[str, Any]


class AlertsResponse(BaseModel):
    """The alert book (``active``, ``resolved`` and counts; docs/alerting.md) with the sinks' counters."""

    enabled: bool
    sinks: dict[str, dict[str, Any]]


class TunerResponse(BaseModel):
    """``enabled`` and ``active`` always; an enabled tuner adds its knobs, readings and decisions (docs/tuner.md)."""

    time: str | None
    enabled: bool
    active: bool


class ConfigChanged(_Answer):
    changed: list[str]


class ConfigPatch(BaseModel):
    """Nested objects of the runtime keys to change: ``{"detectors": {"statistical": {"for_s": 30}}}``."""

    model_config = ConfigDict(extra="allow")


class HealthResponse(_Answer):
    status: Literal["ok", "degraded"]
    uptime_s: float
    series: int
    samples: int
    gpu: dict[str, Any]
    host: dict[str, Any]
    detectors: dict[str, Any]
    alerts: dict[str, Any]
    tuner: dict[str, Any] | None
    forwarding: dict[str, Any] | None
    degraded: dict[str, Any]


_ERRORS = {
    400: "Malformed: not valid JSON or protobuf, nested too deeply, or a broken compression stream.",
    401: "Missing or wrong bearer token.",
    404: "Unknown model or path, or runtime configuration off (no admin token).",
    413: "Body (or its decompressed size) over the receiver's limit.",
    415: "Wrong content type or encoding.",
    422: "An invalid query parameter or configuration value.",
}
_STRING = {"type": "string"}


def _ref(model: type[BaseModel], components: dict[str, Any]) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, definition in schema.pop("$defs", {}).items():
        components.setdefault(name, definition)
    components.setdefault(model.__name__, schema)
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _json_operation(op_id: str, summary: str, answer: type[BaseModel], errors: tuple[int, ...],
                    components: dict[str, Any], **extra: Any) -> dict[str, Any]:
    responses = {"200": {"description": "OK", "content": {JSON: {"schema": _ref(answer, components)}}}}
    for status in errors:
        responses[str(status)] = {"description": _ERRORS[status],
                                  "content": {JSON: {"schema": _ref(ErrorResponse, components)}}}
    return {"operationId": op_id, "summary": summary, "responses": responses, **extra}


def _query(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description, "schema": schema}


def _traces_operation() -> dict[str, Any]:
    otlp = {PROTOBUF: {"schema": {"type": "string", "format": "binary"}},
            "application/protobuf": {"schema": {"type": "string", "format": "binary"}},
            JSON: {"schema": {"type": "object", "description": "OTLP/JSON ExportTraceServiceRequest."}}}
    answer = {PROTOBUF: {"schema": {"type": "string", "format": "binary"}}, JSON: {"schema": {"type": "object"}}}
    responses = {"200": {"description": "ExportTraceServiceResponse (partial success names rejected spans).",
                         "content": answer}}
    for status in (400, 413, 415):
        responses[str(status)] = {"description": f"{_ERRORS[status]} The body is a google.rpc.Status.",
                                  "content": answer}
    return {"operationId": "exportTraces", "summary": "OTLP/HTTP trace receiver (protobuf or JSON, optionally gzip).",
            "externalDocs": {"url": "https://opentelemetry.io/docs/specs/otlp/#otlphttp"},
            "parameters": [{"name": "Content-Encoding", "in": "header", "required": False,
                            "schema": {"type": "string", "enum": ["gzip", "identity"]}}],
            "requestBody": {"required": True, "content": otlp}, "responses": responses}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("muai")
    except PackageNotFoundError:
        return "unknown"


def openapi_document(*, windows: list[str]) -> dict[str, Any]:
    """The document for a sidecar whose monitor keeps ``windows``."""
    c: dict[str, Any] = {}
    stats = _json_operation(
        "getStats", "Rolling-window latency, TTFT, throughput and errors per model and operation.", StatsResponse,
        (404, 422), c, parameters=[
            _query("window", "One window (default: all).", {"type": "string", "enum": windows}),
            _query("scope", "Requests, inference spans, or both.", {"type": "string",
                                                                     "enum": ["request", "inference", "all"]}),
            _query("model", "One model; 404 when the sidecar has never seen it.", _STRING),
            _query("operation", "One operation (`chat`, `text_completion`, ...).", _STRING)])
    patch = _json_operation("patchConfig", "Change the sidecar's runtime keys (`detectors.*`).", ConfigChanged,
                            (400, 401, 404, 413, 422), c, security=[{"adminToken": []}],
                            requestBody={"required": True, "content": {JSON: {"schema": _ref(ConfigPatch, c)}}})
    paths = {
        "/v1/traces": {"post": _traces_operation()},
        "/api/v1/stats": {"get": stats},
        "/api/v1/gpus": {"get": _json_operation("getGpus", "Per-GPU readings (NVML) and their windows.",
                                                GpusResponse, (), c)},
        "/api/v1/host": {"get": _json_operation("getHost", "Host CPU and memory, the orchestrator process, and their "
                                                "windows.", HostResponse, (), c)},
        "/api/v1/alerts": {"get": _json_operation("getAlerts", "Active alerts, resolved history, sink counters.",
                                                  AlertsResponse, (), c)},
        "/api/v1/tuner": {"get": _json_operation("getTuner", "The auto-tuner: knobs, readings, decisions.",
                                                 TunerResponse, (), c)},
        "/api/v1/config": {"patch": patch},
        "/metrics": {"get": {"operationId": "metrics", "summary": "Prometheus exposition.",
                             "responses": {"200": {"description": "OK", "content": {"text/plain": {"schema": _STRING}}}}}},
        "/health": {"get": _json_operation("health", "Liveness and what is degraded.", HealthResponse, (), c)},
        OPENAPI_PATH: {"get": {"operationId": "openapi", "summary": "This document.",
                               "responses": {"200": {"description": "OK",
                                                     "content": {JSON: {"schema": {"type": "object"}}}}}}},
    }
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": "MuAI sidecar", "version": _version(),
                 "description": "The sidecar's OTLP receiver, query API and health. Errors of the query API have one "
                                "shape: `{\"error\": {\"code\", \"message\", ...}}`."},
        "paths": paths,
        "components": {"schemas": dict(sorted(c.items())), "securitySchemes": {"adminToken": {
            "type": "http", "scheme": "bearer", "description": "`sidecar.tuner.admin_token`."}}},
    }


async def openapi_endpoint(request: web.Request) -> web.Response:
    return web.json_response(request.app[OPENAPI])


__all__ = ["OPENAPI", "OPENAPI_PATH", "openapi_document", "openapi_endpoint"]
