"""``POST /v1/workflows/{name}``: a named workflow run as one request (its steps are child spans)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from adapters.base import (
    EngineError,
)
from orchestrator.errors import (
    WorkflowValidationError,
)
from orchestrator.http import errors as err
from orchestrator.http.errors import ApiError
from orchestrator.http.frame import Call, jsonable, map_exception, traced
from orchestrator.http.schemas import (
    WorkflowRequest,
)
from orchestrator.state import ServerState


async def run_workflow(request: web.Request) -> web.StreamResponse:
    return await traced(request, "workflow", _workflow)


def _workflows(state: ServerState) -> dict[str, Any]:
    if state.workflows is None:
        try:
            from orchestrator.workflows import default_workflows
        except ImportError:
            state.workflows = {}
        else:
            state.workflows = default_workflows(state.manager)
    return state.workflows


async def _workflow(call: Call) -> web.StreamResponse:
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
        "result": jsonable(result.result),
        "metadata": jsonable(result.metadata or {}),
        "error": result.error,
        "execution_time": result.execution_time,
    }
    if result.status == "failed":
        if call.recording:
            call.span.set_attribute("error.type", "workflow_failed")
        return web.json_response(payload, status=500)
    return web.json_response(payload)


def _raise_workflow_failure(call: Call, name: str, result: Any) -> None:
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


__all__ = [
    "run_workflow",
]
