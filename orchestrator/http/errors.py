"""HTTP errors: one JSON shape everywhere (OpenAI's), the right status, and a catch-all that never leaks a trace.

``{"error": {"message": ..., "type": ..., "code": ..., "param": ...}}`` with

=====  ========================  ==========================================================
400    invalid_request_error     malformed JSON, a body that is not an object, a bad request for the model
401    authentication_error      admin API without the right bearer token
404    invalid_request_error     unknown model (the message lists the models), unknown route
409    invalid_request_error     admin: a critical configuration key (needs a restart)
413    invalid_request_error     body over ``server.max_body_bytes`` (as sent or inflated)
415    invalid_request_error     a ``Content-Encoding`` other than gzip
422    invalid_request_error     a missing or wrongly typed field, named in ``param``
429    rate_limit_error          queue full (``Retry-After``)
500    server_error              an engine error or a bug (logged with its trace; the client gets none)
503    service_unavailable       draining or a model that is not loaded (``Retry-After``)
504    timeout_error             ``server.request_timeout_s`` passed
=====  ========================  ==========================================================
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from aiohttp import web
from pydantic_core import from_json

from orchestrator.errors import MuaiError
from orchestrator.http.schemas import error_body

log = logging.getLogger("orchestrator.server")

INVALID = "invalid_request_error"


class ApiError(MuaiError):
    """An error answered as JSON with ``status``; ``reject_reason`` (when set) is counted as a rejection."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = INVALID,
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
        reject_reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.param = param
        self.headers = dict(headers or {})
        self.reject_reason = reject_reason

    def response(self) -> web.Response:
        return web.json_response(
            error_body(self.message, self.type, self.code, self.param), status=self.status, headers=self.headers
        )


def bad_json(message: str) -> ApiError:
    return ApiError(400, message, code="invalid_json", reject_reason="invalid")


# pydantic-core's parser (jiter), which the request models validate with too, refuses nesting past about 200
# levels in Rust, before Python's stack is involved: one bound for every JSON body this server reads.
JSON_MAX_DEPTH = 200
TOO_DEEP = f"request body is nested deeper than {JSON_MAX_DEPTH} levels"


def parse_json(raw: bytes) -> Any:
    """A JSON body with its nesting bounded; a 400 ``invalid_json`` saying why when it is not one."""
    try:
        return from_json(raw)
    except ValueError as exc:
        raise _json_error(str(exc)) from None


def _json_error(message: str) -> ApiError:
    if "recursion limit exceeded" in message:
        return bad_json(TOO_DEEP)
    return bad_json(f"request body is not valid JSON: {message}")


def invalid_field(param: str | None, message: str) -> ApiError:
    return ApiError(422, message, code="invalid_value", param=param, reject_reason="invalid")


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"request body exceeds server.max_body_bytes ({limit} bytes)", code="request_too_large",
                    reject_reason="too_large")


def unknown_model(name: str, models: Iterable[str]) -> ApiError:
    listed = ", ".join(sorted(models)) or "none"
    return ApiError(404, f"model {name!r} does not exist; models: {listed}", code="model_not_found", param="model",
                    reject_reason="unknown_model")


def queue_full(message: str, retry_after_s: int, *, reason: str = "queue_full") -> ApiError:
    """429 for a queue that is full (``queue_full``) or waits past its bound (``queue_wait``)."""
    return ApiError(429, message, type_="rate_limit_error", code=reason,
                    headers={"Retry-After": str(retry_after_s)}, reject_reason=reason)


def unavailable(message: str, retry_after_s: int, *, code: str = "draining", reject_reason: str | None = "draining") -> ApiError:
    return ApiError(503, message, type_="service_unavailable", code=code,
                    headers={"Retry-After": str(retry_after_s)}, reject_reason=reject_reason)


def timeout(limit_s: float) -> ApiError:
    return ApiError(504, f"the request did not finish within server.request_timeout_s ({limit_s:g} s)",
                    type_="timeout_error", code="request_timeout")


def internal(message: str = "internal server error", *, code: str = "internal_error") -> ApiError:
    return ApiError(500, message, type_="server_error", code=code)


def format_loc(loc: Iterable[Any]) -> str:
    """``("messages", 0, "content")`` -> ``messages[0].content``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def from_validation(errors: list[Mapping[str, Any]]) -> ApiError:
    """The first problem of a pydantic ``ValidationError`` as a 400 (not JSON / not an object) or a 422."""
    first = errors[0]
    if first["type"] == "json_invalid":
        return _json_error(first["msg"].removeprefix("Invalid JSON: "))
    located = [(_clean_loc(e.get("loc", ())), e) for e in errors]
    loc, _ = located[0]
    if not loc:
        return bad_json("request body must be a JSON object")
    same = [e for l, e in located if l == loc]
    param = format_loc(loc)
    if len(same) > 1 and all(any(isinstance(p, str) and _is_union_tag(p) for p in e.get("loc", ())) for e in same):
        # A union failed on every member: say which types would do.
        kinds = [next(p for p in reversed(e["loc"]) if isinstance(p, str) and _is_union_tag(p)) for e in same]
        message = f"{param}: expected {' or '.join(dict.fromkeys(kinds))}"
    else:
        message = f"{param}: {same[0]['msg']}"
    others = len({l for l, _ in located if l != loc})
    if others:
        message += f" (and {others} more invalid field{'s' if others > 1 else ''})"
    return invalid_field(param, message)


def _clean_loc(loc: Iterable[Any]) -> tuple[Any, ...]:
    return tuple(p for p in loc if not (isinstance(p, str) and _is_union_tag(p)))


def _is_union_tag(part: str) -> bool:
    # pydantic names the union member tried (``str``, ``list[str]``, ``function-after[...]``) in the location.
    return part in ("str", "int", "float", "bool", "none") or "[" in part


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Turn every failure into the JSON error shape; nothing a client sends gets a stack trace back."""
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if isinstance(exc, web.HTTPRequestEntityTooLarge):
            body = error_body(exc.text or "request body too large", INVALID, "request_too_large")
        elif exc.status == 404:
            body = error_body(f"no route {request.method} {request.path}", INVALID, "not_found")
        elif exc.status == 405:
            body = error_body(f"method {request.method} not allowed on {request.path}", INVALID, "method_not_allowed")
        else:
            body = error_body(exc.reason or "error", INVALID if exc.status < 500 else "server_error", None)
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after", "www-authenticate")}
        return web.json_response(body, status=exc.status, headers=headers)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("unhandled error serving %s %s", request.method, request.path)
        return internal().response()


__all__ = [
    "ApiError",
    "bad_json",
    "error_middleware",
    "format_loc",
    "from_validation",
    "internal",
    "invalid_field",
    "parse_json",
    "queue_full",
    "timeout",
    "too_large",
    "unavailable",
    "unknown_model",
]
