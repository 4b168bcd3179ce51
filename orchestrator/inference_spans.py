"""The model manager's inference spans: one ``INTERNAL`` span per request (GenAI attributes plus ``muai.*``),
parented to the span that was current when the request was submitted, even across the batcher's asyncio boundary.

Attributes are built only when a span records; with no tracer given and no SDK provider installed no span is made
at all. The manager decides what runs; this module only says how it is recorded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from adapters.base import EmbeddingResult, StreamChunk
from orchestrator.lean_tracer import UNSAMPLED_CONTEXT

TRACER_NAME = "muai.orchestrator"
OP_GENERATE = "text_completion"
OP_EMBED = "embeddings"


def tracing_off(tracer_given: bool) -> bool:
    """True when every span would be a no-op (no tracer given, no SDK provider installed globally): then none is
    made (a microsecond per request on the batched path). Checked per call: a provider may be set later."""
    return not tracer_given and isinstance(
        trace.get_tracer_provider(), (trace.ProxyTracerProvider, trace.NoOpTracerProvider)
    )


def base_attributes(model: str, op: str, chain: Any, engine_before: str | None, size: int) -> dict[str, Any]:
    """What every span of one engine call shares; ``muai.fallback`` when the engine changed during the call or the
    chain serves degraded."""
    engine = chain.engine_name if chain is not None else engine_before
    degraded = bool(getattr(chain, "degraded_reasons", None)) if chain is not None else False
    return {
        "gen_ai.operation.name": op,
        "gen_ai.request.model": model,
        "muai.engine": engine,
        "muai.batch_size": size,
        "muai.fallback": engine != engine_before or degraded,
    }


def error_type(exc: BaseException) -> str:
    return type(exc).__qualname__


def embed_error(results: Sequence[EmbeddingResult]) -> BaseException | None:
    """The first text's error of one embedding request (None when every text embedded)."""
    for r in results:
        if r.error is not None:
            return r.error
    return None


class CallSpans:
    """The spans of one engine call: one per request, each under the context its request was submitted in."""

    __slots__ = ("spans",)

    def __init__(self, tracer: trace.Tracer | None, name: str, contexts: Sequence[Any]) -> None:
        if tracer is None:
            self.spans: list[Any] = [None] * len(contexts)
        else:
            # A request its trace's sampler dropped has nothing to record, and is told apart by its context alone.
            spans = [None if ctx is UNSAMPLED_CONTEXT else tracer.start_span(name, context=ctx, kind=SpanKind.INTERNAL)
                     for ctx in contexts]
            self.spans = [s if s is not None and s.is_recording() else None for s in spans]

    @property
    def recording(self) -> bool:
        return any(s is not None for s in self.spans)

    def fail(self, base: dict[str, Any], exc: BaseException) -> None:
        """The whole call failed: every span ends with its error."""
        for span in self.spans:
            if span is not None:
                span.set_attributes(base)
                span.set_attribute("error.type", error_type(exc))
                span.set_status(Status(StatusCode.ERROR, str(exc)))
                span.end()

    def finish(self, base: dict[str, Any], op: str, payloads: Sequence[Any], results: Sequence[Any],
               waits: Sequence[float] | None) -> None:
        """The call returned: each span gets its request's usage and ends with that request's own error, if any."""
        for i, span in enumerate(self.spans):
            if span is None:
                continue
            attrs = dict(base)
            if waits is not None:
                attrs["muai.batch_wait_s"] = waits[i]
            result = results[i]
            err: BaseException | None
            if op == OP_GENERATE:
                sp = payloads[i].sampling
                attrs.update({
                    "gen_ai.request.max_tokens": sp.max_new_tokens,
                    "gen_ai.request.temperature": sp.temperature,
                    "gen_ai.request.top_p": sp.top_p,
                    "gen_ai.usage.input_tokens": result.prompt_tokens,
                    "gen_ai.usage.output_tokens": result.completion_tokens,
                    "gen_ai.response.finish_reasons": (result.finish_reason,),
                    "muai.cache_hit": bool(result.cache_hit),
                })
                if result.cached_tokens:
                    attrs["muai.cached_tokens"] = result.cached_tokens
                err = result.error
            else:
                attrs["gen_ai.usage.input_tokens"] = sum(r.prompt_tokens for r in result)
                err = embed_error(result)
            span.set_attributes(attrs)
            if err is not None:
                span.set_attribute("error.type", error_type(err))
                span.set_status(Status(StatusCode.ERROR, str(err)))
            span.end()


class StreamSpan:
    """The one span of a streamed generation, covering the whole stream."""

    __slots__ = ("_span", "recording")

    def __init__(self, tracer: trace.Tracer, name: str) -> None:
        self._span = tracer.start_span(name, kind=SpanKind.INTERNAL)
        self.recording = self._span.is_recording()

    def fail(self, exc: BaseException) -> None:
        # A client leaving (GeneratorExit) is not the stream's error.
        if self.recording and not isinstance(exc, GeneratorExit):
            self._span.set_attribute("error.type", error_type(exc))
            self._span.set_status(Status(StatusCode.ERROR, str(exc)))

    def end(self, base: dict[str, Any] | None, last: StreamChunk | None) -> None:
        if self.recording and base is not None:
            attrs = dict(base)
            if last is not None:
                attrs["gen_ai.usage.input_tokens"] = last.prompt_tokens
                attrs["gen_ai.usage.output_tokens"] = last.completion_tokens
                if last.finish_reason:
                    attrs["gen_ai.response.finish_reasons"] = (last.finish_reason,)
            attrs["muai.streaming"] = True
            self._span.set_attributes(attrs)
        self._span.end()


__all__ = ["OP_EMBED", "OP_GENERATE", "TRACER_NAME", "CallSpans", "StreamSpan", "base_attributes", "embed_error",
           "error_type", "tracing_off"]
