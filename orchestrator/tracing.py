"""OpenTelemetry tracing for the orchestrator: one ``TracerProvider`` per app, OTLP export, never blocking serving.

- **Export** (5.7): OTLP over http/protobuf or grpc to ``telemetry.tracing.endpoint`` through a
  ``BatchSpanProcessor`` (a bounded queue drained by a worker thread; a full queue drops spans rather than wait).
  Never a ``SimpleSpanProcessor``: that would put the export on the request path.
- **Sampling** (``orchestrator.sampling``): ``ParentBased(root=consistent)``: a sampled incoming ``traceparent`` is always followed; new traces
  are sampled with OpenTelemetry's consistent probability sampling (:class:`AdjustableRatioSampler`): at
  ``sampling_ratio`` (runtime) while traffic is below ``sampling_budget_per_s`` traces per second, at that budget
  above it, each kept span carrying its threshold as ``ot=th:`` in its ``tracestate`` (adjusted count 1/p).
- **Cost** (:mod:`orchestrator.lean_tracer`): :class:`LeanTracer` decides a new trace before anything is built;
  an unsampled request makes one prebuilt context current and builds no span (its inner spans are the same
  stand-in); a sampled span is one plain object until it ends, then the SDK's ``ReadableSpan`` for the processor
  and the exporter.
- **Failures** (15.5): :class:`ObservedSpanExporter` wraps the real exporter, counts each failed export call (a
  batch: ``muai_telemetry_export_failures_total{signal="traces"}``) and the spans it carried, logs at most once per
  ``log_period_s``, and reports "exporter failing" to the health state until an export succeeds again. The OTLP
  exporter's own per-attempt log lines are rate limited the same way. With the collector down, requests are served
  as before.
- **Drops**: every span that never reaches the exporter's far end is counted by reason
  (``muai_telemetry_spans_dropped_total{reason}``): ``queue_full`` (:class:`CountingSpanProcessor` turned it away
  because the batch queue was full), ``export_failed`` (in a batch the exporter could not deliver), ``shutdown``
  (ended after shutdown, or still queued when the worker stopped).
- **Propagation** (5.6): W3C trace context in (:func:`extract_context`) and out (:func:`inject_headers`), with an
  explicit propagator so that no process-global state is needed (two servers in one process each keep their own
  provider).

Which spans count as requests is the sidecar's rule (``docs/sidecar-api.md``): the root span of a request is a
``SERVER`` span with ``muai.request = true``; the model manager's inference spans are ``INTERNAL`` children.

The exporter wrapper, the counting processor and :func:`build_tracing` are the stages of one pipeline whose
promises (a drop is counted exactly once, export never blocks a request) hold only across all of them; what is a
policy of its own (sampling) and what decides the request path's cost (the lean tracer) live apart.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from orchestrator.lean_tracer import UNSAMPLED_CONTEXT, UNSAMPLED_SPAN, LeanTracer
from orchestrator.otlp_export import OtlpHttpSpanExporter
from orchestrator.sampling import (
    AdjustableRatioSampler,
    TracingConfigError,
    encode_threshold,
    parse_threshold,
    probability_of,
    threshold_for,
)

log = logging.getLogger(__name__)

LOG_PERIOD_S = 60.0
INSTRUMENTATION_NAME = "muai.orchestrator"
_PROPAGATOR = TraceContextTextMapPropagator()
_EXPORTER_LOGGERS = (
    "opentelemetry.exporter.otlp.common.http",
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "opentelemetry.exporter.otlp.proto.grpc.exporter",
    "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
)




ConsistentProbabilitySampler = AdjustableRatioSampler


class _OncePerPeriod(logging.Filter):
    """Lets one record per logger through per period; the rest are dropped (the failures are still counted)."""

    def __init__(self, period_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._period = period_s
        self._clock = clock
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        now = self._clock()
        with self._lock:
            last = self._last.get(record.name)
            if last is not None and now - last < self._period:
                return False
            self._last[record.name] = now
        return True


_exporter_log_filter: _OncePerPeriod | None = None
_filter_lock = threading.Lock()


def _limit_exporter_logs(period_s: float) -> None:
    # The OTLP exporter logs every retry and every failed batch; with the collector down that floods the log.
    global _exporter_log_filter
    with _filter_lock:
        if _exporter_log_filter is None:
            _exporter_log_filter = _OncePerPeriod(period_s)
            for name in _EXPORTER_LOGGERS:
                logging.getLogger(name).addFilter(_exporter_log_filter)


class ObservedSpanExporter(SpanExporter):
    """Wraps a real exporter: counts failures, logs them at most once per period, reports health. Never raises.

    Runs on the batch processor's worker thread; the callbacks must be thread safe (prometheus_client's are).
    """

    def __init__(
        self,
        inner: SpanExporter,
        *,
        endpoint: str = "",
        on_failure: Callable[[int], None] | None = None,
        on_health: Callable[[str | None], None] | None = None,
        log_period_s: float = LOG_PERIOD_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.inner = inner
        self.endpoint = endpoint
        self._on_failure = on_failure
        self._on_health = on_health
        self._period = log_period_s
        self._clock = clock
        self._last_log: float | None = None
        self._suppressed = 0
        self.failures = 0
        self.successes = 0
        self.failing = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        detail = ""
        try:
            result = self.inner.export(spans)
        except Exception as exc:  # an exporter bug must not kill the worker thread
            result = SpanExportResult.FAILURE
            detail = f"{type(exc).__name__}: {exc}"
        if result is SpanExportResult.SUCCESS:
            self.successes += 1
            if self.failing:
                self.failing = False
                log.info("trace export to %s recovered", self.endpoint or "the exporter")
                if self._on_health is not None:
                    self._on_health(None)
            return result
        self.failures += 1
        self.failing = True
        if self._on_failure is not None:
            self._on_failure(len(spans))
        if self._on_health is not None:
            self._on_health(f"trace export to {self.endpoint or 'the exporter'} failing" + (f": {detail}" if detail else ""))
        now = self._clock()
        if self._last_log is None or now - self._last_log >= self._period:
            more = f" ({self._suppressed} more failures since the last report)" if self._suppressed else ""
            log.warning(
                "trace export to %s failed; %d spans dropped%s%s (serving continues; logged at most every %gs)",
                self.endpoint or "the exporter", len(spans), f": {detail}" if detail else "", more, self._period,
            )
            self._last_log = now
            self._suppressed = 0
        else:
            self._suppressed += 1
        return result

    def shutdown(self) -> None:
        try:
            self.inner.shutdown()
        except Exception as exc:
            log.debug("exporter shutdown failed: %r", exc)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        try:
            return self.inner.force_flush(timeout_millis)
        except Exception:
            return False


DROP_QUEUE_FULL = "queue_full"
DROP_EXPORT_FAILED = "export_failed"
DROP_SHUTDOWN = "shutdown"


class _HandOff(SpanExporter):
    """The batch processor's exporter: tells the counting processor how many spans left the queue, then exports."""

    def __init__(self, inner: SpanExporter, taken: Callable[[int], None]) -> None:
        self.inner = inner
        self._taken = taken

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self._taken(len(spans))
        return self.inner.export(spans)

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


class CountingSpanProcessor(SpanProcessor):
    """A ``BatchSpanProcessor`` that counts the spans it cannot take instead of dropping them silently.

    The SDK's batch queue, when full, drops its oldest span with nothing but a log line per span. Here the spans the
    batch processor holds are counted (in when a sampled span ends, out when the worker hands a batch to the
    exporter); at ``max_queue_size`` a new span is turned away and reported to ``on_drop(1, "queue_full")``, so
    the inner queue never overflows and every loss is counted. Spans ending after shutdown, or still queued when
    the worker stopped, are reported as ``"shutdown"``. Drops are logged at most once per ``log_period_s``.
    ``on_drop`` runs on the thread that ended the span; it must be thread safe (prometheus_client's is).
    """

    def __init__(
        self,
        exporter: SpanExporter,
        *,
        max_queue_size: int = 2048,
        max_export_batch_size: int = 512,
        export_timeout_millis: float = 30000,
        schedule_delay_millis: float | None = None,
        on_drop: Callable[[int, str], None] | None = None,
        log_period_s: float = LOG_PERIOD_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._capacity = max_queue_size
        self._held = 0
        self._closed = False
        self._lock = threading.Lock()
        self._on_drop = on_drop
        self._period = log_period_s
        self._clock = clock
        self._last_log: float | None = None
        self._unlogged = 0
        self.dropped: dict[str, int] = {}
        self._inner = BatchSpanProcessor(
            _HandOff(exporter, self._taken),
            max_queue_size=max_queue_size,
            max_export_batch_size=max_export_batch_size,
            export_timeout_millis=export_timeout_millis,
            schedule_delay_millis=schedule_delay_millis,
        )

    def _taken(self, count: int) -> None:
        # Called just after the worker popped the batch, so for a moment we count more than the queue holds:
        # at worst a span is turned away (and counted) that would have fitted; the inner queue never drops.
        with self._lock:
            self._held = max(0, self._held - count)

    def on_start(self, span: Any, parent_context: Context | None = None) -> None:
        self._inner.on_start(span, parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        if not (span.context and span.context.trace_flags.sampled):
            return
        with self._lock:
            if self._closed:
                reason: str | None = DROP_SHUTDOWN
            elif self._held >= self._capacity:
                reason = DROP_QUEUE_FULL
            else:
                reason = None
                self._held += 1
        if reason is None:
            self._inner.on_end(span)
        else:
            self._drop(1, reason)

    def _drop(self, count: int, reason: str) -> None:
        with self._lock:
            self.dropped[reason] = self.dropped.get(reason, 0) + count
            now = self._clock()
            log_now = self._last_log is None or now - self._last_log >= self._period
            if log_now:
                self._last_log, suppressed, self._unlogged = now, self._unlogged, 0
            else:
                self._unlogged += count
        if log_now:
            more = f" ({suppressed} more since the last report)" if suppressed else ""
            log.warning("%d spans dropped (%s)%s; serving continues; logged at most every %gs",
                        count, reason, more, self._period)
        if self._on_drop is not None:
            try:
                self._on_drop(count, reason)
            except Exception as exc:  # a metrics hook must never break the span path
                log.debug("span drop hook failed: %r", exc)

    def shutdown(self) -> None:
        with self._lock:
            self._closed = True
        self._inner.shutdown()
        with self._lock:
            left, self._held = self._held, 0
        if left:
            self._drop(left, DROP_SHUTDOWN)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


def make_exporter(config: Any) -> SpanExporter:
    """The OTLP exporter for ``telemetry.tracing``: ours for http/protobuf (its encoder costs a third of the
    SDK's), the SDK's for grpc."""
    endpoint = config.endpoint
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise TracingConfigError(f"telemetry.tracing.endpoint must be an http(s) URL, got {endpoint!r}")
    if config.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        credentials = None
        if parts.scheme == "https" and config.ca_file:
            import grpc

            try:
                with open(config.ca_file, "rb") as ca:
                    credentials = grpc.ssl_channel_credentials(root_certificates=ca.read())
            except OSError as exc:
                raise TracingConfigError(f"telemetry.tracing.ca_file {config.ca_file!r}: {exc.strerror or exc}") from exc
        # gRPC addresses a host:port; an OTLP/HTTP style path would be meaningless there.
        return GrpcExporter(
            endpoint=f"{parts.scheme}://{parts.netloc}",
            insecure=parts.scheme == "http",
            credentials=credentials,
            timeout=config.export_timeout_s,
        )
    session = _ca_pinned_session() if config.ca_file else None
    return OtlpHttpSpanExporter(endpoint, certificate_file=config.ca_file, timeout_s=config.export_timeout_s,
                                session=session)


def _ca_pinned_session() -> Any:
    """A requests session whose own ``verify`` (``telemetry.tracing.ca_file``) wins: plain requests lets
    ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE`` replace it on every request (psf/requests#3829)."""
    import requests  # the OTLP/HTTP exporter's own transport; loaded with it

    class CaPinnedSession(requests.Session):
        def merge_environment_settings(self, url, proxies, stream, verify, cert):  # noqa: ANN001, ANN202
            settings = super().merge_environment_settings(url, proxies, stream, verify, cert)
            settings["verify"] = self.verify
            return settings

    return CaPinnedSession()


@dataclass
class Tracing:
    """What the server holds: the provider, its tracer, the adjustable sampler (None for a provider given to us)."""

    provider: Any
    tracer: trace.Tracer
    sampler: AdjustableRatioSampler | None = None
    exporter: ObservedSpanExporter | None = None
    owned: bool = False

    @property
    def enabled(self) -> bool:
        return not isinstance(self.tracer, trace.NoOpTracer)

    def set_sampling_ratio(self, ratio: float) -> bool:
        """Apply a runtime change of ``sampling_ratio``; False when the provider is not ours to change."""
        if self.sampler is None:
            return False
        self.sampler.set_ratio(ratio)
        return True

    def force_flush(self, timeout_s: float) -> bool:
        flush = getattr(self.provider, "force_flush", None)
        if flush is None:
            return True
        try:
            return bool(flush(int(timeout_s * 1000)))
        except Exception as exc:
            log.warning("flushing spans failed: %r", exc)
            return False

    def shutdown(self, timeout_s: float) -> None:
        """Flush what is queued (bounded by ``timeout_s``), then stop the worker if the provider is ours."""
        self.force_flush(timeout_s)
        if self.owned:
            try:
                self.provider.shutdown()
            except Exception as exc:
                log.warning("tracer provider shutdown failed: %r", exc)


def build_tracing(
    config: Any,
    *,
    tracer_provider: Any = None,
    exporter: SpanExporter | None = None,
    on_export_failure: Callable[[int], None] | None = None,
    on_health: Callable[[str | None], None] | None = None,
    log_period_s: float = LOG_PERIOD_S,
    on_spans_dropped: Callable[[int, str], None] | None = None,
) -> Tracing:
    """Tracing for one app from ``telemetry.tracing``.

    ``tracer_provider`` given: use it as is (the caller owns it). Tracing disabled: a no-op tracer, nothing
    recorded or exported. Otherwise a new SDK provider with the parent-based ratio sampler and a
    :class:`CountingSpanProcessor` around the OTLP exporter (or ``exporter``, wrapped the same way).
    ``on_export_failure(spans)`` is called once per failed export call (a batch) with the number of spans it
    carried; ``on_spans_dropped(count, reason)`` for spans the processor could not take (``queue_full``,
    ``shutdown``). A failed batch is not reported to ``on_spans_dropped``: ``on_export_failure`` has its count.
    """
    if tracer_provider is not None:
        return Tracing(tracer_provider, tracer_provider.get_tracer(INSTRUMENTATION_NAME), owned=False)
    if not config.enabled:
        return Tracing(None, trace.NoOpTracer(), owned=False)
    sampler = AdjustableRatioSampler(config.sampling_ratio, budget_per_s=getattr(config, "sampling_budget_per_s", None))
    resource = Resource.create({"service.name": config.service_name})
    provider = TracerProvider(resource=resource, sampler=ParentBased(root=sampler), shutdown_on_exit=False)
    inner = exporter if exporter is not None else make_exporter(config)
    _limit_exporter_logs(log_period_s)
    observed = ObservedSpanExporter(
        inner, endpoint=config.endpoint, on_failure=on_export_failure, on_health=on_health, log_period_s=log_period_s
    )
    queue = config.max_queue_size
    provider.add_span_processor(
        CountingSpanProcessor(
            observed,
            max_queue_size=queue,
            max_export_batch_size=min(512, queue),
            export_timeout_millis=config.export_timeout_s * 1000,
            on_drop=on_spans_dropped,
            log_period_s=log_period_s,
        )
    )
    tracer = LeanTracer(provider.get_tracer(INSTRUMENTATION_NAME), sampler=sampler)
    return Tracing(provider, tracer, sampler, observed, owned=True)


def extract_context(headers: Mapping[str, str]) -> Context:
    """The W3C trace context of incoming headers (``traceparent``/``tracestate``); empty when absent or invalid."""
    if "traceparent" not in headers:
        return Context()
    return _PROPAGATOR.extract(headers)


def inject_headers(headers: MutableMapping[str, str], context: Context | None = None) -> MutableMapping[str, str]:
    """Add ``traceparent``/``tracestate`` of ``context`` (default: the current one) to outgoing headers."""
    _PROPAGATOR.inject(headers, context=context)
    return headers


__all__ = [
    "DROP_EXPORT_FAILED",
    "DROP_QUEUE_FULL",
    "DROP_SHUTDOWN",
    "INSTRUMENTATION_NAME",
    "AdjustableRatioSampler",
    "ConsistentProbabilitySampler",
    "CountingSpanProcessor",
    "LeanTracer",
    "UNSAMPLED_CONTEXT",
    "UNSAMPLED_SPAN",
    "ObservedSpanExporter",
    "Tracing",
    "TracingConfigError",
    "build_tracing",
    "extract_context",
    "inject_headers",
    "make_exporter",
    "encode_threshold",
    "parse_threshold",
    "probability_of",
    "threshold_for",
]
