"""Workflows: named sequences of steps over one or more models, the existing contract kept (13.4).

``Workflow.execute(parameters) -> WorkflowResult`` (blocking) and ``await Workflow.run(parameters)`` (the server's
path) validate the parameters (``WorkflowValidationError`` naming the parameter; ``UnknownModelError`` for a model
that is not registered), then run the steps in order. The workflow is one span, each step a child span, and the
model manager's inference spans are children of the step that called them.

A step that fails stops the workflow with status ``failed``, unless the step is optional: then the workflow goes
on and ends ``partial``, with the step's error in ``WorkflowResult.error`` and ``metadata["steps"]``.

Shipped: ``chat`` (one generate call) and ``embed_then_generate`` (two models in one request: an embedding model
ranks the given documents against the query, the best ones become the context of a generation).
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from adapters.base import GenerationRequest, SamplingParams
from orchestrator.errors import UnknownModelError, UnknownWorkflowError, WorkflowValidationError

WorkflowStatus = Literal["success", "partial", "failed"]


@dataclass(slots=True)
class WorkflowResult:
    """What a workflow returns: its result, metadata (per-step status and timings), status, error, duration."""

    result: Any
    metadata: dict[str, Any] = field(default_factory=dict)
    status: WorkflowStatus = "success"
    error: str | None = None
    execution_time: float = 0.0
    exception: BaseException | None = field(default=None, repr=False, compare=False)
    """The exception of the step that failed the workflow (status ``failed``), so that a server can answer with
    the status it deserves (a model not ready is a 503, a bad request a 4xx); not part of ``to_dict``."""

    @property
    def ok(self) -> bool:
        return self.status == "success"

    def to_dict(self) -> dict[str, Any]:
        return {
            "result": self.result,
            "metadata": self.metadata,
            "status": self.status,
            "error": self.error,
            "execution_time": self.execution_time,
        }


StepFn = Callable[[dict[str, Any], dict[str, Any]], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class WorkflowStep:
    """A named step: ``fn(parameters, state)`` returns a value stored as ``state[name]``."""

    name: str
    fn: StepFn
    optional: bool = False


class Workflow(ABC):
    """Base of all workflows: validation, required models, and steps run under spans."""

    name: ClassVar[str]
    description: ClassVar[str] = ""

    def __init__(self, manager: Any, *, tracer: trace.Tracer | None = None) -> None:
        self.manager = manager
        self.tracer = tracer if tracer is not None else getattr(manager, "tracer", None) or trace.get_tracer(__name__)

    @abstractmethod
    def steps(self) -> Sequence[WorkflowStep]:
        """The steps, in order."""

    @abstractmethod
    def get_required_models(self, parameters: Mapping[str, Any] | None = None) -> list[str]:
        """The models a run with ``parameters`` (defaults when None) uses."""

    @abstractmethod
    def _validate(self, parameters: Mapping[str, Any]) -> dict[str, Any]:
        """Check and normalise; raise ``WorkflowValidationError`` naming the parameter."""

    def validate_parameters(self, parameters: Mapping[str, Any] | None) -> dict[str, Any]:
        """Normalised parameters; ``WorkflowValidationError`` or ``UnknownModelError`` when they cannot run."""
        if parameters is None:
            parameters = {}
        if not isinstance(parameters, Mapping):
            raise WorkflowValidationError(f"workflow {self.name!r}: parameters must be an object, got {type(parameters).__name__}")
        params = self._validate(parameters)
        registered = self.manager.models()
        for model in self.get_required_models(params):
            if model not in registered:
                raise UnknownModelError(model, registered)
        return params

    async def run(self, parameters: Mapping[str, Any] | None) -> WorkflowResult:
        """Validate, then run every step (each a child span of the workflow's span)."""
        params = self.validate_parameters(parameters)
        started = time.perf_counter()
        state: dict[str, Any] = {}
        step_meta: list[dict[str, Any]] = []
        status: WorkflowStatus = "success"
        error: str | None = None
        failure: BaseException | None = None
        with self.tracer.start_as_current_span(f"workflow {self.name}", record_exception=False, set_status_on_exception=False) as wf_span:
            if wf_span.is_recording():
                wf_span.set_attribute("muai.workflow", self.name)
                wf_span.set_attribute("muai.workflow.models", self.get_required_models(params))
            for step in self.steps():
                t0 = time.perf_counter()
                with self.tracer.start_as_current_span(
                    f"workflow.step {step.name}", record_exception=False, set_status_on_exception=False
                ) as span:
                    if span.is_recording():
                        span.set_attribute("muai.workflow", self.name)
                        span.set_attribute("muai.workflow.step", step.name)
                    try:
                        state[step.name] = await step.fn(params, state)
                        outcome = "success"
                    except Exception as exc:
                        outcome = "failed"
                        message = f"step {step.name!r} failed: {type(exc).__name__}: {exc}"
                        if span.is_recording():
                            span.record_exception(exc)
                            span.set_attribute("error.type", type(exc).__qualname__)
                            span.set_status(Status(StatusCode.ERROR, str(exc)))
                        error = message if error is None else f"{error}; {message}"
                        if step.optional:
                            status = "partial"
                        else:
                            status = "failed"
                            failure = exc
                    step_meta.append({"name": step.name, "status": outcome, "duration_s": time.perf_counter() - t0})
                if status == "failed":
                    break
            if wf_span.is_recording():
                wf_span.set_attribute("muai.workflow.status", status)
                if status == "failed":
                    wf_span.set_status(Status(StatusCode.ERROR, error or ""))
        result = None if status == "failed" else self._result(params, state)
        return WorkflowResult(
            result=result,
            metadata={"workflow": self.name, "models": self.get_required_models(params), "steps": step_meta},
            status=status,
            error=error,
            execution_time=time.perf_counter() - started,
            exception=failure,
        )

    def execute(self, parameters: Mapping[str, Any] | None) -> WorkflowResult:
        """Blocking ``run`` (the existing contract); not for use inside an event loop."""
        return self.manager.run_sync(self.run(parameters))

    @abstractmethod
    def _result(self, params: dict[str, Any], state: dict[str, Any]) -> Any:
        """The workflow's result from the steps' values."""


# -- parameter helpers --------------------------------------------------------------------------------------------


def _first_model(manager: Any, task: str) -> str | None:
    for model in manager.config.models:
        if model.task == task:
            return model.name
    return None


def _str(params: Mapping[str, Any], key: str, *, workflow: str, required: bool = True, default: str | None = None) -> str | None:
    value = params.get(key, default)
    if value is None:
        if required:
            raise WorkflowValidationError(f"workflow {workflow!r}: parameter {key!r} is required")
        return None
    if not isinstance(value, str) or (required and not value.strip()):
        raise WorkflowValidationError(f"workflow {workflow!r}: parameter {key!r} must be a non-empty string")
    return value


def _sampling(params: Mapping[str, Any], *, workflow: str) -> SamplingParams:
    try:
        max_new = int(params.get("max_new_tokens", 16))
        temperature = float(params.get("temperature", 0.0))
        top_p = float(params.get("top_p", 1.0))
    except (TypeError, ValueError) as exc:
        raise WorkflowValidationError(f"workflow {workflow!r}: sampling parameters must be numbers: {exc}") from exc
    if max_new < 1:
        raise WorkflowValidationError(f"workflow {workflow!r}: parameter 'max_new_tokens' must be >= 1, got {max_new}")
    if temperature < 0:
        raise WorkflowValidationError(f"workflow {workflow!r}: parameter 'temperature' must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise WorkflowValidationError(f"workflow {workflow!r}: parameter 'top_p' must be in (0, 1], got {top_p}")
    stop = params.get("stop", ())
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise WorkflowValidationError(f"workflow {workflow!r}: parameter 'stop' must be a string or a list of strings")
    seed = params.get("seed")
    if seed is not None and not isinstance(seed, int):
        raise WorkflowValidationError(f"workflow {workflow!r}: parameter 'seed' must be an integer")
    return SamplingParams(max_new_tokens=max_new, temperature=temperature, top_p=top_p, stop=tuple(stop), seed=seed)


def render_messages(messages: Sequence[Mapping[str, Any]]) -> str:
    """The one chat template, for models without one of their own (the tiny models have none): each message as
    ``<|role|>\ncontent\n``, then ``<|assistant|>\n``. ``/v1/chat/completions`` and the ``chat`` workflow both use it,
    so the same conversation gives the same prompt (and the same KV-cache prefix) on either path."""
    parts = [f"<|{m['role']}|>\n{m['content']}\n" for m in messages]
    parts.append("<|assistant|>\n")
    return "".join(parts)


def _usage(result: Any) -> dict[str, int]:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


# -- chat ---------------------------------------------------------------------------------------------------------


class ChatWorkflow(Workflow):
    """One generation: ``prompt`` (or chat ``messages``) -> text. Parameters: ``model`` (default: the first generate
    model), ``prompt`` | ``messages``, ``max_new_tokens``, ``temperature``, ``top_p``, ``stop``, ``seed``,
    ``conversation_id`` (multi-turn KV-cache reuse)."""

    name = "chat"
    description = "Generate a completion for a prompt or a list of chat messages."

    def steps(self) -> Sequence[WorkflowStep]:
        return (WorkflowStep("prepare", self._prepare), WorkflowStep("generate", self._generate))

    def get_required_models(self, parameters: Mapping[str, Any] | None = None) -> list[str]:
        model = (parameters or {}).get("model") or _first_model(self.manager, "generate")
        return [model] if model else []

    def _validate(self, parameters: Mapping[str, Any]) -> dict[str, Any]:
        w = self.name
        model = _str(parameters, "model", workflow=w, required=False) or _first_model(self.manager, "generate")
        if model is None:
            raise WorkflowValidationError(f"workflow {w!r}: parameter 'model' is required (no generate model is configured)")
        prompt = _str(parameters, "prompt", workflow=w, required=False)
        messages = parameters.get("messages")
        if (prompt is None) == (messages is None):
            raise WorkflowValidationError(f"workflow {w!r}: give exactly one of 'prompt' or 'messages'")
        if messages is not None:
            if not isinstance(messages, list) or not messages or not all(
                isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages
            ):
                raise WorkflowValidationError(
                    f"workflow {w!r}: parameter 'messages' must be a non-empty list of {{role, content}} strings"
                )
        elif not prompt.strip():
            raise WorkflowValidationError(f"workflow {w!r}: parameter 'prompt' must be a non-empty string")
        cid = parameters.get("conversation_id")
        if cid is not None and (not isinstance(cid, str) or not cid):
            raise WorkflowValidationError(f"workflow {w!r}: parameter 'conversation_id' must be a non-empty string")
        return {
            "model": model,
            "prompt": prompt,
            "messages": messages,
            "sampling": _sampling(parameters, workflow=w),
            "conversation_id": cid,
        }

    async def _prepare(self, params: dict[str, Any], state: dict[str, Any]) -> str:
        return params["prompt"] if params["messages"] is None else render_messages(params["messages"])

    async def _generate(self, params: dict[str, Any], state: dict[str, Any]) -> Any:
        request = GenerationRequest(state["prepare"], params["sampling"], conversation_id=params["conversation_id"])
        return await self.manager.generate(params["model"], request)

    def _result(self, params: dict[str, Any], state: dict[str, Any]) -> Any:
        out = state["generate"]
        return {"text": out.text, "finish_reason": out.finish_reason, "model": params["model"], "usage": _usage(out)}


# -- embed then generate ------------------------------------------------------------------------------------------


def _cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    na = math.sqrt(sum(x * x for x in a)) or 1.0
    nb = math.sqrt(sum(y * y for y in b)) or 1.0
    return dot / (na * nb)


class EmbedThenGenerateWorkflow(Workflow):
    """Retrieval then generation, two models in one request: ``embed_model`` ranks ``documents`` against ``query``,
    the ``top_k`` best become the context of ``generate_model``'s answer. When embedding fails the answer is still
    generated without context and the workflow ends ``partial``."""

    name = "embed_then_generate"
    description = "Rank documents by embedding similarity to the query, then answer with the best as context."

    def steps(self) -> Sequence[WorkflowStep]:
        return (
            WorkflowStep("embed", self._embed, optional=True),
            WorkflowStep("retrieve", self._retrieve, optional=True),
            WorkflowStep("generate", self._generate),
        )

    def get_required_models(self, parameters: Mapping[str, Any] | None = None) -> list[str]:
        p = parameters or {}
        models = [p.get("embed_model") or _first_model(self.manager, "embed"),
                  p.get("generate_model") or _first_model(self.manager, "generate")]
        return [m for m in models if m]

    def _validate(self, parameters: Mapping[str, Any]) -> dict[str, Any]:
        w = self.name
        query = _str(parameters, "query", workflow=w)
        documents = parameters.get("documents")
        if not isinstance(documents, list) or not documents or not all(isinstance(d, str) and d for d in documents):
            raise WorkflowValidationError(f"workflow {w!r}: parameter 'documents' must be a non-empty list of strings")
        embed_model = _str(parameters, "embed_model", workflow=w, required=False) or _first_model(self.manager, "embed")
        generate_model = _str(parameters, "generate_model", workflow=w, required=False) or _first_model(self.manager, "generate")
        if embed_model is None or generate_model is None:
            raise WorkflowValidationError(f"workflow {w!r}: parameters 'embed_model' and 'generate_model' are required")
        top_k = parameters.get("top_k", 1)
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
            raise WorkflowValidationError(f"workflow {w!r}: parameter 'top_k' must be an integer >= 1")
        return {
            "query": query,
            "documents": list(documents),
            "embed_model": embed_model,
            "generate_model": generate_model,
            "top_k": min(top_k, len(documents)),
            "sampling": _sampling(parameters, workflow=w),
        }

    async def _embed(self, params: dict[str, Any], state: dict[str, Any]) -> list[list[float]]:
        results = await self.manager.embed(params["embed_model"], [params["query"], *params["documents"]])
        return [r.vector for r in results]

    async def _retrieve(self, params: dict[str, Any], state: dict[str, Any]) -> list[tuple[int, float]]:
        vectors = state.get("embed")
        if vectors is None:
            raise RuntimeError("no embeddings to rank (the embed step failed)")
        query, docs = vectors[0], vectors[1:]
        scored = sorted(((i, _cosine(query, d)) for i, d in enumerate(docs)), key=lambda x: -x[1])
        return scored[: params["top_k"]]

    async def _generate(self, params: dict[str, Any], state: dict[str, Any]) -> Any:
        ranked = state.get("retrieve") or []
        context = "\n".join(params["documents"][i] for i, _ in ranked)
        prompt = f"Context:\n{context}\n\nQuestion: {params['query']}\nAnswer:" if context else f"Question: {params['query']}\nAnswer:"
        return await self.manager.generate(params["generate_model"], GenerationRequest(prompt, params["sampling"]))

    def _result(self, params: dict[str, Any], state: dict[str, Any]) -> Any:
        out = state["generate"]
        ranked = state.get("retrieve") or []
        return {
            "text": out.text,
            "finish_reason": out.finish_reason,
            "context": [params["documents"][i] for i, _ in ranked],
            "scores": [round(s, 6) for _, s in ranked],
            "models": {"embed": params["embed_model"], "generate": params["generate_model"]},
            "usage": _usage(out),
        }


WORKFLOW_CLASSES: dict[str, type[Workflow]] = {
    ChatWorkflow.name: ChatWorkflow,
    EmbedThenGenerateWorkflow.name: EmbedThenGenerateWorkflow,
}


def default_workflows(manager: Any, *, tracer: trace.Tracer | None = None) -> dict[str, Workflow]:
    """The shipped workflows, by name, bound to ``manager``."""
    return {name: cls(manager, tracer=tracer) for name, cls in WORKFLOW_CLASSES.items()}


def get_workflow(workflows: Mapping[str, Workflow], name: str) -> Workflow:
    """``workflows[name]``, or ``UnknownWorkflowError`` listing the known ones."""
    try:
        return workflows[name]
    except KeyError:
        raise UnknownWorkflowError(name, workflows) from None


__all__ = [
    "ChatWorkflow",
    "EmbedThenGenerateWorkflow",
    "WORKFLOW_CLASSES",
    "Workflow",
    "WorkflowResult",
    "WorkflowStatus",
    "WorkflowStep",
    "default_workflows",
    "get_workflow",
    "render_messages",
]
