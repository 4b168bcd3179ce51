"""The sidecar's Prometheus series, on a registry of its own (one per app, so two sidecars share nothing).

Counters the sidecar bumps as it works live in :class:`SidecarMetrics`; everything derived (windowed
percentiles, throughput, error ratios, GPU and host gauges, alert and notification counts, detector scores)
is computed at scrape time by :class:`_DerivedCollector` from the sidecar's state. The per-series window
statistics (series x windows percentile selections, the costly part) are computed at most once per
``SERIES_CACHE_S`` of the sidecar's clock and reused by scrapes within it: scraping runs on the event loop
that ingests spans, so many or frequent scrapers must not multiply that work.

Names: ``muai_sidecar_*`` for the sidecar's own series and the statistics it derives, ``muai_gpu_*`` for
per-GPU gauges with DCGM's meanings, ``muai_host_*`` for the host, ``muai_orchestrator_process_*`` for the
watched process.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily
from prometheus_client.samples import Sample

from sidecar.otlp import INFERENCE, REQUEST

if TYPE_CHECKING:
    from sidecar.app import SidecarState

SERIES_CACHE_S = 1.0
_QUANTILES = (("0.5", "p50"), ("0.95", "p95"), ("0.99", "p99"))
_SERIES_LABELS = ["model", "operation", "window"]
_GPU_LABELS = ["gpu", "uuid", "name"]


class SidecarMetrics:
    """The sidecar's own counters, bound once, plus the scrape-time collector."""

    def __init__(self, registry: CollectorRegistry, state: Callable[[], SidecarState | None]) -> None:
        self.registry = registry
        exports = Counter(
            "muai_sidecar_export_requests_total",
            "OTLP/HTTP export requests received at /v1/traces, by encoding and HTTP status code.",
            ["encoding", "code"],
            registry=registry,
        )
        self._exports = exports
        self._export_children: dict[tuple[str, int], object] = {}
        self.spans_received = Counter(
            "muai_sidecar_spans_received_total", "Spans received in accepted OTLP export requests.", registry=registry
        )
        self.spans_rejected = Counter(
            "muai_sidecar_spans_rejected_total",
            "Spans rejected in OTLP partial-success responses (invalid ids or end before start).",
            registry=registry,
        )
        samples = Counter(
            "muai_sidecar_span_samples_total",
            "Spans that fed the statistics, by scope (request or inference).",
            ["scope"],
            registry=registry,
        )
        self.samples = {REQUEST: samples.labels(REQUEST), INFERENCE: samples.labels(INFERENCE)}
        self.samples_untracked = Counter(
            "muai_sidecar_span_samples_untracked_total",
            "Request/inference spans not tracked because monitor.max_series was reached.",
            registry=registry,
        )
        collector_errors = Counter(
            "muai_sidecar_collector_errors_total", "Failed resource samples, by collector.", ["collector"], registry=registry
        )
        self.collector_errors = {name: collector_errors.labels(name) for name in ("gpu", "host")}
        evaluation_errors = Counter(
            "muai_sidecar_evaluation_errors_total", "Detector evaluation ticks that raised.", registry=registry
        )
        self.evaluation_errors = evaluation_errors
        registry.register(_DerivedCollector(state))

    def export(self, encoding: str, code: int) -> None:
        child = self._export_children.get((encoding, code))
        if child is None:
            child = self._export_children[(encoding, code)] = self._exports.labels(encoding, str(code))
        child.inc()


def _finite(x: float | None) -> bool:
    return x is not None and not math.isnan(x)


def _quantiles(family: SummaryMetricFamily, labels: list[str], stats) -> None:
    """The windowed quantiles of one summary child (labels: model, operation, window)."""
    names = dict(zip(family._labelnames, labels))
    for q, attr in _QUANTILES:
        v = getattr(stats, attr)
        if _finite(v):
            family.samples.append(Sample(family.name, {**names, "quantile": q}, v))


def _totals(family: SummaryMetricFamily, model: str, operation: str, count: int, total: float) -> None:
    """Cumulative ``_count``/``_sum`` since start, once per series and without a ``window`` label.

    Repeating them for every window would multiply ``sum(rate(x_count[5m]))`` by the number of windows;
    ``rate(x_sum) / rate(x_count)`` is the mean latency, as with any client-library summary.
    """
    labels = {"model": model, "operation": operation}
    family.samples.append(Sample(family.name + "_count", labels, count))
    family.samples.append(Sample(family.name + "_sum", labels, total))


class _DerivedCollector:
    """Reads the sidecar's state at scrape time."""

    def __init__(self, state: Callable[[], SidecarState | None]) -> None:
        self._state = state
        self._series_cache: list | None = None
        self._series_at = 0.0

    def describe(self):
        # Nothing to pre-register: names are fixed and the registry needs no duplicate check for them.
        return []

    def collect(self):
        state = self._state()
        if state is None:
            return
        yield from self._cached_series(state)
        yield from self._gpus(state)
        yield from self._host(state)
        yield from self._alerting(state)
        yield from self._forwarding(state)

    # -- request statistics ----------------------------------------------------------------------------

    def _cached_series(self, state) -> list:
        now = state.clock()
        if self._series_cache is None or not self._series_at <= now < self._series_at + SERIES_CACHE_S:
            self._series_cache = list(self._series(state, now))
            self._series_at = now
        return self._series_cache

    def _series(self, state, now: float):
        monitor = state.monitor
        latency = SummaryMetricFamily(
            "muai_sidecar_latency_seconds",
            "Request latency: quantiles over the rolling window (span duration, or gen_ai.latency.e2e); "
            "count and sum since start (no window label).",
            labels=_SERIES_LABELS,
        )
        ttft = SummaryMetricFamily(
            "muai_sidecar_time_to_first_token_seconds",
            "Time to first token (gen_ai.latency.time_to_first_token): quantiles over the rolling window; "
            "count and sum since start (no window label).",
            labels=_SERIES_LABELS,
        )
        inference = SummaryMetricFamily(
            "muai_sidecar_inference_latency_seconds",
            "Inference span latency (spans below the request span): quantiles over the rolling window; "
            "count and sum since start (no window label).",
            labels=_SERIES_LABELS,
        )
        window_requests = GaugeMetricFamily(
            "muai_sidecar_window_requests", "Requests in the rolling window.", labels=_SERIES_LABELS
        )
        throughput = GaugeMetricFamily(
            "muai_sidecar_throughput_requests_per_second", "Requests per second over the rolling window.", labels=_SERIES_LABELS
        )
        inference_rate = GaugeMetricFamily(
            "muai_sidecar_inference_throughput_per_second", "Inference spans per second over the rolling window.", labels=_SERIES_LABELS
        )
        error_ratio = GaugeMetricFamily(
            "muai_sidecar_error_ratio", "Share of requests in the rolling window that failed (0-1).", labels=_SERIES_LABELS
        )
        tokens_in = GaugeMetricFamily(
            "muai_sidecar_input_tokens_per_second", "Prompt tokens per second over the rolling window.", labels=_SERIES_LABELS
        )
        tokens_out = GaugeMetricFamily(
            "muai_sidecar_output_tokens_per_second", "Generated tokens per second over the rolling window.", labels=_SERIES_LABELS
        )
        requests_total = CounterMetricFamily(
            "muai_sidecar_requests", "Requests seen since the sidecar started.", labels=["model", "operation"]
        )
        errors_total = CounterMetricFamily(
            "muai_sidecar_request_errors", "Failed requests seen since the sidecar started.", labels=["model", "operation"]
        )
        for key in monitor.keys(scope=None):
            s = None
            for window in monitor.windows:
                s = monitor.series_stats(key, window, now)
                labels = [key.model, key.operation, window]
                if key.scope == INFERENCE:
                    inference_rate.add_metric(labels, s.throughput_rps)
                    _quantiles(inference, labels, s.latency)
                    continue
                window_requests.add_metric(labels, s.requests)
                throughput.add_metric(labels, s.throughput_rps)
                if _finite(s.error_ratio):
                    error_ratio.add_metric(labels, s.error_ratio)
                tokens_in.add_metric(labels, s.input_tokens_per_s)
                tokens_out.add_metric(labels, s.output_tokens_per_s)
                _quantiles(latency, labels, s.latency)
                if s.ttft is not None:
                    _quantiles(ttft, labels, s.ttft)
            if s is None:
                continue
            if key.scope == INFERENCE:
                _totals(inference, key.model, key.operation, s.requests_total, s.latency_sum_total)
                continue
            _totals(latency, key.model, key.operation, s.requests_total, s.latency_sum_total)
            if s.ttft is not None:
                _totals(ttft, key.model, key.operation, s.ttft_count_total, s.ttft_sum_total)
        for key, requests, errors in monitor.totals():
            if key.scope == REQUEST:
                requests_total.add_metric([key.model, key.operation], requests)
                errors_total.add_metric([key.model, key.operation], errors)
        series = GaugeMetricFamily("muai_sidecar_series", "Series (model, operation, scope) the monitor tracks.")
        series.add_metric([], monitor.series_count)
        yield from (latency, ttft, inference, window_requests, throughput, inference_rate, error_ratio,
                    tokens_in, tokens_out, requests_total, errors_total, series)

    # -- resources -------------------------------------------------------------------------------------

    def _gpus(self, state):
        available = GaugeMetricFamily("muai_sidecar_gpu_available", "1 when NVML could be read, 0 with no GPU or driver.")
        available.add_metric([], 1.0 if state.gpu is not None and state.gpu.available else 0.0)
        yield available
        gauges = {
            "utilization_ratio": ("muai_gpu_utilization_ratio", "GPU utilisation (DCGM_FI_DEV_GPU_UTIL) as 0-1."),
            "memory_utilization_ratio": ("muai_gpu_memory_copy_utilization_ratio", "Memory copy utilisation (DCGM_FI_DEV_MEM_COPY_UTIL) as 0-1."),
            "framebuffer_used_bytes": ("muai_gpu_framebuffer_used_bytes", "Framebuffer memory used (DCGM_FI_DEV_FB_USED) in bytes."),
            "framebuffer_free_bytes": ("muai_gpu_framebuffer_free_bytes", "Framebuffer memory free (DCGM_FI_DEV_FB_FREE) in bytes."),
            "framebuffer_total_bytes": ("muai_gpu_framebuffer_total_bytes", "Framebuffer memory total in bytes."),
            "temperature_celsius": ("muai_gpu_temperature_celsius", "GPU temperature (DCGM_FI_DEV_GPU_TEMP) in degrees Celsius."),
            "power_watts": ("muai_gpu_power_watts", "Power draw (DCGM_FI_DEV_POWER_USAGE) in watts."),
            "power_limit_watts": ("muai_gpu_power_limit_watts", "Enforced power limit in watts."),
            "sm_clock_hz": ("muai_gpu_sm_clock_hertz", "SM clock (DCGM_FI_DEV_SM_CLOCK) in hertz."),
            "memory_clock_hz": ("muai_gpu_memory_clock_hertz", "Memory clock (DCGM_FI_DEV_MEM_CLOCK) in hertz."),
            "last_xid": ("muai_gpu_last_xid", "Code of the latest XID error seen (DCGM_FI_DEV_XID_ERRORS)."),
        }
        families = {attr: GaugeMetricFamily(name, doc, labels=_GPU_LABELS) for attr, (name, doc) in gauges.items()}
        xid = CounterMetricFamily("muai_gpu_xid_errors", "XID critical errors seen since the sidecar started.", labels=_GPU_LABELS)
        ecc = CounterMetricFamily(
            "muai_gpu_ecc_errors", "Volatile ECC errors since the driver loaded, by type.", labels=[*_GPU_LABELS, "type"]
        )
        procs = GaugeMetricFamily(
            "muai_gpu_process_memory_used_bytes", "GPU memory held by one process, where the driver tells.", labels=[*_GPU_LABELS, "pid"]
        )
        for g in state.gpu_samples:
            labels = [str(g.index), g.uuid, g.name]
            for attr, family in families.items():
                v = getattr(g, attr)
                if v is not None:
                    family.add_metric(labels, float(v))
            xid.add_metric(labels, g.xid_errors_total)
            if g.ecc_corrected_total is not None:
                ecc.add_metric([*labels, "corrected"], g.ecc_corrected_total)
            if g.ecc_uncorrected_total is not None:
                ecc.add_metric([*labels, "uncorrected"], g.ecc_uncorrected_total)
            for p in g.processes:
                if p.used_bytes is not None:
                    procs.add_metric([*labels, str(p.pid)], p.used_bytes)
        yield from families.values()
        yield from (xid, ecc, procs)

    def _host(self, state):
        h = state.host_sample
        if h is None:
            return
        specs = (
            ("muai_host_cpu_utilization_ratio", "Host CPU utilisation over all cores (0-1) since the previous sample.", h.cpu_percent / 100.0),
            ("muai_host_memory_total_bytes", "Host memory in bytes.", h.memory_total_bytes),
            ("muai_host_memory_used_bytes", "Host memory in use (total - available) in bytes.", h.memory_used_bytes),
            ("muai_host_memory_available_bytes", "Host memory available in bytes.", h.memory_available_bytes),
            ("muai_host_memory_utilization_ratio", "Host memory in use as 0-1.", h.memory_percent / 100.0),
        )
        for name, doc, value in specs:
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], float(value))
            yield g
        up = GaugeMetricFamily("muai_orchestrator_process_up", "1 while the watched orchestrator process is found.")
        up.add_metric([], 0.0 if h.orchestrator is None else 1.0)
        yield up
        if h.orchestrator is not None:
            cpu = GaugeMetricFamily(
                "muai_orchestrator_process_cpu_utilization_ratio", "Orchestrator process CPU as a fraction of one core (may exceed 1)."
            )
            cpu.add_metric([], h.orchestrator.cpu_percent / 100.0)
            rss = GaugeMetricFamily("muai_orchestrator_process_resident_memory_bytes", "Orchestrator process resident memory in bytes.")
            rss.add_metric([], float(h.orchestrator.rss_bytes))
            yield cpu
            yield rss

    # -- alerting --------------------------------------------------------------------------------------

    def _alerting(self, state):
        if state.book is None:
            return
        counts = state.book.counts()
        for name, doc, key in (
            ("muai_sidecar_alerts_firing", "Alerts firing now.", "firing"),
            ("muai_sidecar_alerts_pending", "Alerts pending (condition holds, for-duration not yet met).", "pending"),
        ):
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], counts.get(key, 0))
            yield g
        transitions = CounterMetricFamily("muai_sidecar_alert_transitions", "Alert transitions since start, by new state.", labels=["state"])
        for to, n in state.book.transitions.items():
            transitions.add_metric([to], n)
        yield transitions
        sent = CounterMetricFamily("muai_sidecar_notifications_sent", "Notifications delivered, by sink.", labels=["sink"])
        failed = CounterMetricFamily("muai_sidecar_notifications_failed", "Notifications given up after retries, by sink.", labels=["sink"])
        dropped = CounterMetricFamily(
            "muai_sidecar_notifications_dropped", "Notifications dropped from a full buffer or at shutdown, by sink.", labels=["sink"]
        )
        retries = CounterMetricFamily("muai_sidecar_notification_retries", "Extra delivery attempts, by sink.", labels=["sink"])
        suppressed = CounterMetricFamily(
            "muai_sidecar_notifications_suppressed", "Notifications or alerts held back by rate limiting, by sink and reason.",
            labels=["sink", "reason"],
        )
        queued = GaugeMetricFamily("muai_sidecar_notifications_queued", "Notifications waiting for delivery, by sink.", labels=["sink"])
        for dispatcher in state.dispatchers:
            for sink, st in dispatcher.stats().items():
                sent.add_metric([sink], st.sent)
                failed.add_metric([sink], st.failed)
                dropped.add_metric([sink], st.dropped)
                retries.add_metric([sink], st.retries)
                queued.add_metric([sink], st.queued)
                for reason, n in st.suppressed.items():
                    suppressed.add_metric([sink, reason], n)
        yield from (sent, failed, dropped, retries, suppressed, queued)
        if state.evaluator is not None:
            scores = GaugeMetricFamily(
                "muai_sidecar_detector_score", "Latest anomaly score of a statistical detector on a series' p95 latency.",
                labels=["detector", "model", "operation"],
            )
            for s in state.evaluator.scores():
                if _finite(s.score):
                    scores.add_metric([s.detector, s.model, s.operation], s.score)
            yield scores

    def _forwarding(self, state):
        fwd = state.forwarder
        if fwd is None:
            return
        families = (
            ("muai_sidecar_forwarded_batches", "Span batches forwarded to forwarding.endpoint.", fwd.sent),
            ("muai_sidecar_forward_failures", "Span batches that could not be forwarded after retries.", fwd.failed),
            ("muai_sidecar_forward_dropped_batches", "Span batches dropped because the forwarding queue was full (batches or bytes).",
             fwd.dropped),
        )
        for name, doc, value in families:
            c = CounterMetricFamily(name, doc)
            c.add_metric([], value)
            yield c
        q = GaugeMetricFamily("muai_sidecar_forward_queue_batches", "Span batches waiting to be forwarded.")
        q.add_metric([], fwd.queued)
        yield q


__all__ = ["SERIES_CACHE_S", "SidecarMetrics"]
