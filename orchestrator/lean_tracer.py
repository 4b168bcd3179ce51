"""The orchestrator's tracer: what an unsampled request costs (next to nothing) and what a sampled one costs (one
plain object per span, handed to the SDK's span processors when it ends).

- **Unsampled** (issue 16): a new trace is decided first, on 56 random bits against the sampler's current
  threshold. A dropped one is :data:`UNSAMPLED_SPAN` made current through the prebuilt :data:`UNSAMPLED_CONTEXT`:
  no span, span context or context is built for it, and its inner spans find that stand-in and return it. Under
  an incoming ``traceparent`` that is not sampled the remote parent stands in the same way.
- **Sampled**: a :class:`RecordedSpan`, which keeps its name, ids, times, attributes, events and status in plain
  fields and becomes the SDK's ``ReadableSpan`` when it ends, for the provider's processors (the counting batch
  processor, then the OTLP exporter). The SDK's own span takes a lock and cleans every attribute on every
  ``set_attribute`` (about 35 us a span here); this one checks attribute values once, at the end (about a
  fifth of that). A kept new trace's id carries the randomness it was decided on in its low 56 bits, and its
  span records the threshold as ``ot=th:`` in its ``tracestate``; children inherit the parent's ``tracestate``,
  as the SDK's parent-based sampler would.

The spans are used from the event loop's thread (the server, the batcher, workflows); they take no lock.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Mapping
from random import getrandbits
from typing import Any

from opentelemetry import context as context_api
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from orchestrator.sampling import RANDOM_BITS, AdjustableRatioSampler, encode_threshold, with_threshold

_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_NOT_SAMPLED = TraceFlags(TraceFlags.DEFAULT)
_PLAIN_VALUES = (str, bool, int, float)


def _random_trace_id(low: int | None = None) -> int:
    """A random trace id; ``low`` gives its low 56 bits (the randomness a sampling decision was made on)."""
    while True:
        trace_id = getrandbits(128) if low is None else (getrandbits(128 - RANDOM_BITS) << RANDOM_BITS) | low
        if trace_id:
            return trace_id


def _random_span_id() -> int:
    while True:
        span_id = getrandbits(64)
        if span_id:
            return span_id


class _UnsampledSpan(trace.NonRecordingSpan):
    """The current span of every new trace the sampler dropped: one object for all of them.

    Its span context is asked for only when a context leaves the process (headers for a downstream engine) or by
    code outside the lean tracer: each ask gets a fresh random trace id, not sampled, so that a downstream never
    sees two requests share a trace and still knows this one was not sampled.
    """

    def __init__(self) -> None:
        super().__init__(trace.INVALID_SPAN_CONTEXT)

    def get_span_context(self) -> SpanContext:
        return SpanContext(_random_trace_id(), _random_span_id(), is_remote=False, trace_flags=_NOT_SAMPLED)


UNSAMPLED_SPAN = _UnsampledSpan()
UNSAMPLED_CONTEXT = trace.set_span_in_context(UNSAMPLED_SPAN)


def _clean(attributes: Mapping[str, Any]) -> dict[str, Any]:
    """What the OTLP encoder can carry: plain values and homogeneous sequences of them (as tuples); ``None`` and
    anything else left out, as the SDK's span would."""
    clean: dict[str, Any] = {}
    for key, value in attributes.items():
        if isinstance(value, _PLAIN_VALUES):
            clean[key] = value
        elif isinstance(value, (list, tuple)) and (not value or (isinstance(value[0], _PLAIN_VALUES) and all(
                type(v) is type(value[0]) for v in value))):
            clean[key] = tuple(value)
    return clean


class RecordedSpan(trace.Span):
    """A sampled span of the lean tracer: plain fields while it runs, the SDK's ``ReadableSpan`` when it ends."""

    __slots__ = ("_tracer", "_name", "_context", "_parent", "_kind", "_start", "_attributes", "_events", "_status",
                 "_ended")

    def __init__(self, tracer: LeanTracer, name: str, context: SpanContext, parent: SpanContext | None,
                 kind: SpanKind, attributes: Mapping[str, Any] | None, start_time: int | None) -> None:
        self._tracer = tracer
        self._name = name
        self._context = context
        self._parent = parent
        self._kind = kind
        self._start = start_time if start_time is not None else time.time_ns()
        self._attributes: dict[str, Any] = dict(attributes) if attributes else {}
        self._events: list[Event] = []
        self._status = Status(StatusCode.UNSET)
        self._ended = False

    @property
    def name(self) -> str:
        return self._name

    def get_span_context(self) -> SpanContext:
        return self._context

    def is_recording(self) -> bool:
        return not self._ended

    def set_attribute(self, key: str, value: Any) -> None:
        if not self._ended:
            self._attributes[key] = value

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        if not self._ended:
            self._attributes.update(attributes)

    def add_event(self, name: str, attributes: Mapping[str, Any] | None = None, timestamp: int | None = None) -> None:
        if not self._ended:
            self._events.append(Event(name, _clean(attributes) if attributes else None,
                                      timestamp if timestamp is not None else time.time_ns()))

    def add_link(self, context: SpanContext, attributes: Mapping[str, Any] | None = None) -> None:
        pass  # links are never made by the orchestrator; a late link is allowed to be dropped

    def update_name(self, name: str) -> None:
        if not self._ended:
            self._name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        # The SDK's rules: OK is final, UNSET never overrides, a description only with a bare ERROR code.
        if self._ended or self._status.status_code is StatusCode.OK:
            return
        if isinstance(status, StatusCode):
            status = Status(status, description)
        if status.status_code is not StatusCode.UNSET:
            self._status = status

    def record_exception(self, exception: BaseException, attributes: Mapping[str, Any] | None = None,
                         timestamp: int | None = None, escaped: bool = False) -> None:
        cls = type(exception)
        module = cls.__module__
        event = {
            "exception.type": f"{module}.{cls.__qualname__}" if module and module != "builtins" else cls.__qualname__,
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
            "exception.escaped": str(escaped),
        }
        if attributes:
            event.update(attributes)
        self.add_event("exception", event, timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self._ended:
            return
        self._ended = True
        tracer = self._tracer
        tracer.processor.on_end(ReadableSpan(
            self._name, self._context, self._parent, tracer.resource, _clean(self._attributes), tuple(self._events),
            (), self._kind, None, self._status, self._start, end_time if end_time is not None else time.time_ns(),
            tracer.scope,
        ))


class _AsCurrent:
    """``span`` made current in ``context`` for a ``with`` block (nothing attached when ``context`` is None: the
    span is already current). A class rather than a generator: this is on every request."""

    __slots__ = ("span", "context", "token")

    def __init__(self, span: trace.Span, context: Context | None) -> None:
        self.span = span
        self.context = context
        self.token: object | None = None

    def __enter__(self) -> trace.Span:
        if self.context is not None:
            self.token = context_api.attach(self.context)
        return self.span

    def __exit__(self, *exc: object) -> None:
        if self.token is not None:
            context_api.detach(self.token)


class LeanTracer(trace.Tracer):
    """The tracer of one provider (``inner``, the SDK's, gives its processors, resource and scope) and its
    consistent probability sampler: see the module's docstring."""

    def __init__(self, inner: Any, *, sampler: AdjustableRatioSampler) -> None:
        self.inner = inner
        self.processor = inner.span_processor
        self.resource = inner.resource
        self.scope = getattr(inner, "_instrumentation_scope", None)
        self._sampler = sampler
        self._trace_states: dict[int, TraceState] = {}  # a new trace's tracestate (``ot=th:``) per threshold

    def start_span(self, name, context=None, kind=SpanKind.INTERNAL, attributes=None, links=None, start_time=None,
                   record_exception=True, set_status_on_exception=True) -> trace.Span:
        return self._start(name, context, trace.get_current_span(context), kind, attributes, start_time)

    def _start(self, name: str, context: Context | None, parent: trace.Span, kind: SpanKind,
               attributes: Mapping[str, Any] | None, start_time: int | None) -> trace.Span:
        if parent is UNSAMPLED_SPAN:
            return parent
        parent_context = parent.get_span_context()
        if parent_context.is_valid:
            if not parent_context.trace_flags.sampled:
                return parent  # an incoming unsampled traceparent: its trace is not recorded here either
            span_context = SpanContext(parent_context.trace_id, _random_span_id(), is_remote=False,
                                       trace_flags=_SAMPLED, trace_state=parent_context.trace_state)
        else:
            threshold = self._sampler.root_threshold()
            if threshold is None:
                return UNSAMPLED_SPAN
            randomness = getrandbits(RANDOM_BITS)
            if randomness < threshold:
                return UNSAMPLED_SPAN
            state = self._trace_states.get(threshold)
            if state is None:
                state = with_threshold(None, encode_threshold(threshold))
                if len(self._trace_states) < 256:  # a budget's threshold follows the traffic: keep a bounded few
                    self._trace_states[threshold] = state
            span_context = SpanContext(_random_trace_id(randomness), _random_span_id(), is_remote=False,
                                       trace_flags=_SAMPLED, trace_state=state)
            parent_context = None
        span = RecordedSpan(self, name, span_context, parent_context, kind, attributes, start_time)
        self.processor.on_start(span, parent_context=context)
        return span

    def start_as_current_span(self, name, context=None, kind=SpanKind.INTERNAL, attributes=None, links=None,
                              start_time=None, record_exception=True, set_status_on_exception=True,
                              end_on_exit=True):
        parent = trace.get_current_span(context)
        span = self._start(name, context, parent, kind, attributes, start_time)
        if type(span) is RecordedSpan:
            return trace.use_span(span, end_on_exit=end_on_exit, record_exception=record_exception,
                                  set_status_on_exception=set_status_on_exception)
        if span is parent and context is None:
            return _AsCurrent(span, None)  # the current, unsampled span stays current: nothing to attach
        if span is UNSAMPLED_SPAN and not context and (context is not None or not context_api.get_current()):
            return _AsCurrent(span, UNSAMPLED_CONTEXT)
        # An unsampled stand-in made current in a context that carries more (baggage, an incoming parent).
        return _AsCurrent(span, trace.set_span_in_context(span, context))


__all__ = ["UNSAMPLED_CONTEXT", "UNSAMPLED_SPAN", "LeanTracer", "RecordedSpan"]
