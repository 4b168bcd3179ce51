"""Schemathesis over every operation of an OpenAPI document against a live server, as the contract tests and
``muai bench fuzz`` run it.

Schemathesis calls the server with ``requests`` (blocking): a caller that serves from its own event loop runs
:func:`fuzz` in a worker thread.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass
class FuzzReport:
    cases: dict[str, int] = field(default_factory=dict)
    """Cases sent per operation."""
    statuses: dict[str, set[int]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


def narrowed(document: Mapping[str, Any], *, models: Mapping[str, list[str]] | None = None,
             parameters: Mapping[tuple[str, str], list[str]] | None = None) -> dict[str, Any]:
    """``document`` with the ``model`` property of the named request schemas (``models``) and the named path or
    query parameters (``parameters``: ``(path, name)``) narrowed to these values, so that generated requests reach
    the engines and workflows instead of stopping at a 404 for a random name (the random bodies cover those)."""
    doc = copy.deepcopy(dict(document))
    schemas = doc["components"]["schemas"]
    for schema, names in (models or {}).items():
        schemas[schema]["properties"]["model"] = {"type": "string", "enum": list(names)}
    for (path, name), names in (parameters or {}).items():
        for operation in doc["paths"][path].values():
            for parameter in operation.get("parameters", ()):
                if parameter["name"] == name:
                    parameter["schema"] = {"type": "string", "enum": list(names)}
    return doc


def no_server_error(ctx: Any, response: Any, case: Any) -> None:
    """No 5xx, except a 503 that says when to come back: that one is the server shedding load as designed."""
    status = response.status_code
    if status >= 500 and not (status == 503 and "Retry-After" in response.headers):
        raise AssertionError(f"{status} from {case.method} {case.formatted_path}: {response.text[:300]}")


def fuzz(
    document: dict[str, Any],
    base_url: str,
    *,
    max_examples: int,
    headers: Callable[[str], Mapping[str, str]] = lambda operation_id: {},
    skip: frozenset[str] = frozenset(),
    negative: bool = False,
) -> FuzzReport:
    """Schemathesis over every operation of ``document`` (except ``skip``, by operationId) against ``base_url``:
    no answer 5xx (:func:`no_server_error`), and every answer's status, media type, headers and body as the
    document says. ``headers(operation_id)`` adds headers to every call (an admin token). ``negative`` generates
    requests that break the document (wrong types, missing fields) instead of ones that follow it."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.generation.modes import GenerationMode
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [no_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
              response_schema_conformance]
    schema = schemathesis.openapi.from_dict(document)
    report = FuzzReport()
    from hypothesis.errors import Unsatisfiable

    def run_operation(operation: Any, op_id: str, extra: dict[str, str]) -> None:
        @settings(max_examples=max_examples, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(GenerationMode.NEGATIVE if negative else GenerationMode.POSITIVE))
        def run(case: Any) -> None:
            response = case.call(base_url=base_url, headers=extra, timeout=30)
            report.cases[op_id] += 1
            report.statuses[op_id].add(response.status_code)
            case.validate_response(response, checks=checks)

        run()

    for result in schema.get_all_operations():
        operation = result.ok()
        op_id = operation.definition.raw.get("operationId", operation.label)
        if op_id in skip:
            continue
        report.cases[op_id] = 0
        report.statuses[op_id] = set()
        try:
            run_operation(operation, op_id, dict(headers(op_id)))
        except Unsatisfiable:
            if not negative:
                raise
            # An operation that takes no input has no request that breaks the document: nothing to send.
            del report.cases[op_id], report.statuses[op_id]
        except (Exception, BaseExceptionGroup) as exc:  # the shrunk failing case, as hypothesis reports it
            report.failures.append(f"{op_id}: {type(exc).__name__}: {str(exc)[:2000]}")
    return report


__all__ = ["FuzzReport", "fuzz", "narrowed", "no_server_error"]
