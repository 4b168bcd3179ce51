"""The orchestrator's Prometheus metrics (Requirement 4) on an explicit ``CollectorRegistry``.

Names follow DESIGN.md: ``muai_`` prefix, base units, ``_total`` on counters, with the meanings operators know from
vLLM (time to first token, time per output token, running/waiting requests, prefix cache hits/queries), DCGM (GPU
framebuffer used) and Triton (inference count vs execution count: their ratio is the mean batch size).

Hot path. The per-request families (latency, queue time, time to first token, time per output token, tokens,
``muai_requests_total``) and the per-batch ones (``muai_batch_size``, the batch inference and execution counts)
are this module's own series (:class:`_Histogram`, :class:`_Count`) bound once per
(model, engine) and kept (:class:`ModelMetrics`): a request's whole record is one lock, a bisect per histogram and
a few additions, where prometheus_client's children take a lock and a check per ``observe``/``inc`` (about 40 Python
calls a request against about 15). They are exposed by :class:`_RequestCollector` exactly as prometheus_client's
would be (``_bucket``/``_sum``/``_count``/``_created``, ``_total``), every request counted. Queue depth and running
requests are read at scrape time from the admission state (``set_function``), never pushed per request.

Background. Process CPU/memory (psutil) and GPU memory (NVML when present, else torch's CUDA stats when torch is
already imported and CUDA initialised, else absent) are sampled by :class:`ResourceSampler` in the server's
background loop; engine statistics (KV cache, vLLM prefix cache, vLLM's running/waiting requests, preemptions and
KV-cache usage as ``muai_engine_*{model}``) likewise. Scrapes only read the last snapshot.
A sampler or collector that fails is logged once, counted, reported to the health state and skipped: the rest of
the exposition and serving go on (15.4).

``muai_time_to_first_token_seconds`` and ``muai_time_per_output_token_seconds`` are observed for streamed
requests, where the first token is actually seen; a non-streamed request only has its end-to-end latency.

Why one module of a little over 700 lines: every family the orchestrator exports is declared here, on one registry, beside
the samplers that feed the scrape-time ones and the request path's own series with their collector, so
``docs/metrics.md`` (generated) and ``promtool check metrics`` see the whole exposition from one place and a name
cannot be declared twice; moving the request series out would put their family names in a second module.
"""

from __future__ import annotations

import bisect
import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Exemplar, Sample
from prometheus_client.utils import floatToGoString

log = logging.getLogger(__name__)

# LLM latencies span milliseconds (an echo or a cache hit) to minutes (long generations on CPU). Between 0.5 and
# 5 s, where latency objectives usually lie, the buckets are fine enough for a p99 just past an objective to read as
# just past it: with nothing between 1 and 2.5 s, a tail of 1.1 s interpolated to 2.4 s, and the tuner halved a wait
# bound that needed a tenth off.
LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 7.5, 10.0, 15.0, 20.0,
    30.0, 60.0, 120.0, 240.0, 480.0, 960.0,
)
QUEUE_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0,
)
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)
TPOT_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
LOAD_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0)

OPERATIONS = ("chat", "text_completion", "embeddings", "workflow")
STATUSES = ("ok", "error", "invalid", "timeout", "cancelled")
REJECT_REASONS = ("queue_full", "queue_wait", "draining", "invalid", "too_large", "unknown_model")
LIFECYCLE_EVENTS = ("load_start", "load_ok", "load_fail", "unload")
SPAN_DROP_REASONS = ("queue_full", "export_failed", "shutdown")
THROUGHPUT_WINDOW_S = 60.0
_MAX_LABEL = 64


def _label(value: object) -> str:
    text = "" if value is None else str(value)
    return text[:_MAX_LABEL]


class _Histogram:
    """One histogram series: counts per bucket (not cumulative), their sum, and the last exemplar per bucket.
    Not locked itself: its owner (:class:`ModelMetrics`) holds one lock around a whole request's record."""

    __slots__ = ("bounds", "counts", "total", "created", "exemplars")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.total = 0.0
        self.created = time.time()
        self.exemplars: dict[int, Exemplar] = {}

    def observe(self, value: float, trace_id: str | None = None) -> None:
        i = bisect.bisect_left(self.bounds, value)  # the first bound with value <= bound: Prometheus's `le`
        self.counts[i] += 1
        self.total += value
        if trace_id is not None:
            self.exemplars[i] = Exemplar({"trace_id": trace_id}, value, time.time())

    def read(self) -> tuple[list[int], float, dict[int, Exemplar], float]:
        return list(self.counts), self.total, dict(self.exemplars), self.created


class _Count:
    """One counter series (a running total and when it started)."""

    __slots__ = ("labels", "value", "created")

    def __init__(self, labels: tuple[str, ...] = ()) -> None:
        self.labels = labels
        self.value = 0.0
        self.created = time.time()


class ModelMetrics:
    """The per-(model, engine) series, bound once; what the request path touches."""

    __slots__ = ("model", "engine", "latency", "queue", "ttft", "tpot", "prompt_tokens", "generation_tokens",
                 "batch_size", "batch_inferences", "batch_executions", "_lock")

    def __init__(self, model: str, engine: str) -> None:
        self.model = model
        self.engine = engine
        self.latency = _Histogram(LATENCY_BUCKETS)
        self.queue = _Histogram(QUEUE_BUCKETS)
        self.ttft = _Histogram(TTFT_BUCKETS)
        self.tpot = _Histogram(TPOT_BUCKETS)
        self.prompt_tokens = _Count()
        self.generation_tokens = _Count()
        self.batch_size = _Histogram(BATCH_SIZE_BUCKETS)
        self.batch_inferences = _Count()
        self.batch_executions = _Count()
        self._lock = threading.Lock()

    def observe(
        self,
        *,
        e2e_s: float,
        queue_s: float,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        ttft_s: float | None = None,
        tpot_s: float | None = None,
        trace_id: str | None = None,
    ) -> None:
        """``trace_id`` (32 hex digits) of a sampled request links its latency and time to first token to its
        trace: an OpenMetrics exemplar, shown to scrapers that ask for OpenMetrics. Only sampled requests carry
        one, so the cost stays with the few requests that already pay for a span."""
        with self._lock:
            self.latency.observe(max(0.0, e2e_s), trace_id)
            self.queue.observe(max(0.0, queue_s))
            if prompt_tokens:
                self.prompt_tokens.value += prompt_tokens
            if completion_tokens:
                self.generation_tokens.value += completion_tokens
            if ttft_s is not None:
                self.ttft.observe(max(0.0, ttft_s), trace_id)
            if tpot_s is not None:
                self.tpot.observe(max(0.0, tpot_s))

    def observe_failed(self, *, e2e_s: float, queue_s: float | None = None) -> None:
        """A request that did not end ``ok`` (error, timeout, cancelled): its latency, and its queue time when it
        got a running slot; no tokens."""
        with self._lock:
            self.latency.observe(max(0.0, e2e_s))
            if queue_s is not None:
                self.queue.observe(max(0.0, queue_s))

    def on_batch(self, size: int) -> None:
        """One engine execution of ``size`` requests (once per batch, not per request)."""
        with self._lock:
            self.batch_size.observe(size)
            self.batch_inferences.value += size
            self.batch_executions.value += 1

    def read(self) -> dict[str, Any]:
        """A consistent copy of every series, for one scrape."""
        with self._lock:
            return {
                "latency": self.latency.read(), "queue": self.queue.read(), "ttft": self.ttft.read(),
                "tpot": self.tpot.read(),
                "prompt_tokens": (self.prompt_tokens.value, self.prompt_tokens.created),
                "generation_tokens": (self.generation_tokens.value, self.generation_tokens.created),
                "batch_size": self.batch_size.read(),
                "batch_inferences": (self.batch_inferences.value, self.batch_inferences.created),
                "batch_executions": (self.batch_executions.value, self.batch_executions.created),
            }


# name, help, ModelMetrics field, bounds
_REQUEST_HISTOGRAMS = (
    ("muai_request_latency_seconds",
     "End-to-end latency of admitted requests, admission to last byte, whatever their outcome (vLLM's "
     "e2e_request_latency).", "latency", LATENCY_BUCKETS),
    ("muai_request_queue_seconds", "Time from admission until the request got a running slot.", "queue", QUEUE_BUCKETS),
    ("muai_time_to_first_token_seconds", "Time from admission to the first streamed token.", "ttft", TTFT_BUCKETS),
    ("muai_time_per_output_token_seconds", "Mean time between streamed output tokens after the first.", "tpot",
     TPOT_BUCKETS),
    ("muai_batch_size", "Requests per engine execution (dynamic batcher).", "batch_size", BATCH_SIZE_BUCKETS),
)
# name (without _total), help, ModelMetrics field
_REQUEST_COUNTERS = (
    ("muai_prompt_tokens", "Prompt tokens processed.", "prompt_tokens"),
    ("muai_generation_tokens", "Tokens generated.", "generation_tokens"),
    ("muai_batch_inference_count", "Requests executed in batches (Triton's inference count).", "batch_inferences"),
    ("muai_batch_execution_count",
     "Batch executions (Triton's execution count; inference/execution is the mean batch size).", "batch_executions"),
)
# Fields shown only for (model, engine) pairs that executed a batch, as a labelled child would be.
_BATCH_FIELDS = frozenset({"batch_size", "batch_inferences", "batch_executions"})


class _RequestCollector(Collector):
    """Exposes the request-path series of :class:`ServerMetrics` as prometheus_client's own families would be."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        # Names only, so the registry knows them (and refuses a duplicate) before any request.
        return list(self._families({}, {}))

    def collect(self) -> Iterable[Metric]:
        m = self._metrics
        with m._lock:
            bound = dict(m._bound)
            requests = {c.labels: (c.value, c.created) for c in m._request_counts.values()}
        return list(self._families({key: mm.read() for key, mm in bound.items()}, requests))

    @staticmethod
    def _families(series: Mapping[tuple[str, str], dict[str, Any]],
                  requests: Mapping[tuple[str, str, str], tuple[float, float]]) -> Iterable[Metric]:
        me = ["model", "engine"]
        batched = {key: read for key, read in series.items() if read["batch_executions"][0]}
        for name, help_text, field, bounds in _REQUEST_HISTOGRAMS:
            family = HistogramMetricFamily(name, help_text, labels=me)
            les = [floatToGoString(b) for b in bounds] + ["+Inf"]
            for (model, engine), read in (batched if field in _BATCH_FIELDS else series).items():
                counts, total, exemplars, created = read[field]
                buckets: list[Any] = []
                running = 0
                for i, le in enumerate(les):
                    running += counts[i]
                    exemplar = exemplars.get(i)
                    buckets.append((le, running, exemplar) if exemplar is not None else (le, running))
                family.add_metric([model, engine], buckets, total)
                family.samples.append(Sample(f"{name}_created", {"model": model, "engine": engine}, created))
            yield family
        done = CounterMetricFamily(
            "muai_requests",
            "Admitted requests finished, by model, operation and status (ok, error, invalid, timeout, cancelled).",
            labels=["model", "operation", "status"],
        )
        for labels, (value, created) in requests.items():
            done.add_metric(list(labels), value, created=created)
        yield done
        for name, help_text, field in _REQUEST_COUNTERS:
            family = CounterMetricFamily(name, help_text, labels=me)
            for (model, engine), read in (batched if field in _BATCH_FIELDS else series).items():
                value, created = read[field]
                family.add_metric([model, engine], value, created=created)
            yield family


class ThroughputWindow:
    """Completed requests per second over a sliding window, from samples of a running total. Pure: takes ``now``.

    The request path only bumps an integer; the background loop calls :meth:`sample` and reads :meth:`rate`.
    """

    def __init__(self, *, window_s: float = THROUGHPUT_WINDOW_S) -> None:
        if window_s <= 0:
            raise ValueError(f"window_s must be positive, got {window_s}")
        self.window_s = window_s
        self._samples: deque[tuple[float, int]] = deque()

    def sample(self, now: float, total: int) -> None:
        self._samples.append((now, total))
        # Keep one sample at or before the window start so the rate covers the whole window.
        while len(self._samples) >= 2 and self._samples[1][0] <= now - self.window_s:
            self._samples.popleft()

    def rate(self, now: float) -> float:
        if len(self._samples) < 2:
            return 0.0
        t0, n0 = self._samples[0]
        t1, n1 = self._samples[-1]
        if t1 <= t0:
            return 0.0
        return max(0, n1 - n0) / (t1 - t0)


@dataclass(frozen=True, slots=True)
class ResourceSnapshot:
    """One sample of the process and its GPUs."""

    cpu_seconds: float | None = None
    resident_bytes: int | None = None
    gpu_used_bytes: Mapping[str, int] | None = None
    gpu_total_bytes: Mapping[str, int] | None = None
    gpu_source: str = ""


class ResourceSampler:
    """Samples process CPU and memory (psutil) and GPU memory (NVML, else torch's CUDA stats, else absent).

    Called from a background thread, never on the request path. NVML is initialised once; where it cannot be
    (no driver, no GPU) that is noted once and GPU memory comes from torch or stays absent.
    """

    def __init__(self) -> None:
        import psutil

        self._process = psutil.Process()
        self._nvml: Any = None
        self._nvml_tried = False
        self.gpu_note = ""

    def _nvml_handles(self) -> list[Any] | None:
        if not self._nvml_tried:
            self._nvml_tried = True
            try:
                import pynvml

                pynvml.nvmlInit()
                self._nvml = pynvml
            except Exception as exc:  # NVMLError_LibraryNotFound on machines without a driver
                self.gpu_note = f"NVML unavailable: {type(exc).__name__}"
                log.info("GPU memory via NVML unavailable (%s); falling back to torch's CUDA stats if any", exc)
        if self._nvml is None:
            return None
        count = self._nvml.nvmlDeviceGetCount()
        return [self._nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]

    def _gpu(self) -> tuple[dict[str, int] | None, dict[str, int] | None, str]:
        handles = self._nvml_handles()
        if handles is not None:
            used, total = {}, {}
            for index, handle in enumerate(handles):
                info = self._nvml.nvmlDeviceGetMemoryInfo(handle)
                used[str(index)] = int(info.used)
                total[str(index)] = int(info.total)
            return used, total, "nvml"
        torch = sys.modules.get("torch")  # never import torch just to look
        cuda = getattr(torch, "cuda", None)
        if cuda is not None and cuda.is_available() and cuda.is_initialized():
            used = {str(i): int(cuda.memory_reserved(i)) for i in range(cuda.device_count())}
            total = {str(i): int(cuda.get_device_properties(i).total_memory) for i in range(cuda.device_count())}
            return used, total, "torch"
        return None, None, ""

    def sample(self) -> ResourceSnapshot:
        times = self._process.cpu_times()
        rss = self._process.memory_info().rss
        used, total, source = self._gpu()
        return ResourceSnapshot(times.user + times.system, int(rss), used, total, source)

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass
            self._nvml = None


# Engine statistic keys -> (metric, kind). The fallback chain and engines report what they have; absent keys are
# simply not exposed.
_ENGINE_STATS: dict[str, tuple[str, str, str]] = {
    "kv_cache_hits": ("muai_kv_cache_hits", "counter", "Conversation KV-cache lookups that found the history."),
    "kv_cache_misses": ("muai_kv_cache_misses", "counter", "Conversation KV-cache lookups that missed."),
    "kv_cache_evictions": ("muai_kv_cache_evictions", "counter", "Conversations evicted from the KV cache (LRU, budget)."),
    "kv_cache_bytes": ("muai_kv_cache_bytes", "gauge", "Bytes held by cached conversation KV state."),
    "kv_cache_entries": ("muai_kv_cache_entries", "gauge", "Conversations held in the KV cache."),
    "prefix_cache_hits": ("muai_prefix_cache_hits", "counter", "Prompt tokens served from the engine's prefix cache (vLLM)."),
    "prefix_cache_queries": ("muai_prefix_cache_queries", "counter", "Prompt tokens looked up in the engine's prefix cache (vLLM)."),
    # vLLM's own scheduler view (VllmEngine.stats()), with vLLM's meanings: its num_requests_running/waiting are
    # inside the engine's scheduler, unlike muai_requests_running/waiting, which are this server's admission queue.
    "num_requests_running": ("muai_engine_requests_running", "gauge",
                             "Requests in the engine's running batch (vLLM's num_requests_running)."),
    "num_requests_waiting": ("muai_engine_requests_waiting", "gauge",
                             "Requests waiting in the engine's own scheduler queue (vLLM's num_requests_waiting)."),
    "num_preemptions": ("muai_engine_preemptions", "counter",
                        "Requests preempted by the engine to free KV-cache blocks (vLLM's num_preemptions)."),
    "kv_cache_usage": ("muai_engine_kv_cache_usage_ratio", "gauge",
                       "Share of the engine's KV-cache blocks in use, 0 to 1 (vLLM's kv_cache_usage_perc)."),
}
_STAT_ALIASES = {
    "hits": "kv_cache_hits",
    "misses": "kv_cache_misses",
    "evictions": "kv_cache_evictions",
    "bytes_held": "kv_cache_bytes",
    "entries": "kv_cache_entries",
    "kv_cache_bytes_held": "kv_cache_bytes",
}


def normalise_engine_stats(stats: Mapping[str, Any]) -> dict[str, float]:
    """Map an engine's ``stats()`` keys (``CacheStats`` names, ``kv_cache_*``/``prefix_cache_*``, and vLLM's
    ``num_requests_running``, ``num_requests_waiting``, ``num_preemptions``, ``kv_cache_usage``) to ours. Token
    counts an engine reports are left out: ``muai_prompt_tokens``/``muai_generation_tokens`` already count them."""
    out: dict[str, float] = {}
    for key, value in stats.items():
        key = _STAT_ALIASES.get(key, key)
        if key in _ENGINE_STATS and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value)
    return out


TUNABLE_SETTINGS = (
    "server.queue_capacity",
    "server.max_queue_wait_s",
    "server.max_running_per_model",
    "batching.max_batch_size",
    "batching.min_batch_size",
    "batching.batch_timeout_s",
    "kv_cache.budget_bytes",
    "telemetry.tracing.sampling_ratio",
)
"""The runtime keys ``muai_runtime_setting`` shows: the knobs the tuner turns, and the sampling ratio."""


def runtime_settings(config: Any) -> dict[str, float]:
    """``TUNABLE_SETTINGS`` read off a configuration; keys without a value (no limit) are left out."""
    out: dict[str, float] = {}
    for key in TUNABLE_SETTINGS:
        node: Any = config
        for part in key.split("."):
            node = getattr(node, part, None)
        if isinstance(node, bool) or not isinstance(node, int | float):
            continue
        out[key] = float(node)
    return out


class _SnapshotCollector(Collector):
    """Exposes the last background samples; a failure here is logged once and skipped, never raised."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self._metrics = metrics
        self._failed = False

    def collect(self) -> Iterable[Metric]:
        try:
            families = list(self._families())
        except Exception as exc:
            self._failed = True
            self._metrics.sampler_failed("collector:snapshot", exc)
            return []
        if self._failed:
            self._failed = False
            self._metrics.sampler_ok("collector:snapshot")
        return families

    def _families(self) -> Iterable[Metric]:
        m = self._metrics
        res = m.resources
        if res is not None:
            if res.cpu_seconds is not None:
                cpu = CounterMetricFamily(
                    "muai_process_cpu_seconds", "User and system CPU time of the orchestrator process (psutil)."
                )
                cpu.add_metric([], res.cpu_seconds)
                yield cpu
            if res.resident_bytes is not None:
                rss = GaugeMetricFamily("muai_process_resident_memory_bytes", "Resident memory of the orchestrator process (psutil).")
                rss.add_metric([], res.resident_bytes)
                yield rss
            if res.gpu_used_bytes:
                used = GaugeMetricFamily(
                    "muai_gpu_memory_used_bytes",
                    "GPU framebuffer memory used (NVML: whole device, DCGM's FB_USED; torch: reserved by this process).",
                    labels=["gpu"],
                )
                for gpu, value in sorted(res.gpu_used_bytes.items()):
                    used.add_metric([gpu], value)
                yield used
            if res.gpu_total_bytes:
                total = GaugeMetricFamily("muai_gpu_memory_total_bytes", "GPU framebuffer memory in total.", labels=["gpu"])
                for gpu, value in sorted(res.gpu_total_bytes.items()):
                    total.add_metric([gpu], value)
                yield total
        stats = m.engine_stats
        for key, (name, kind, help_text) in _ENGINE_STATS.items():
            rows = [(model, values[key]) for model, values in sorted(stats.items()) if key in values]
            if not rows:
                continue
            family = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(name, help_text, labels=["model"])
            for model, value in rows:
                family.add_metric([model], value)
            yield family
        if m.settings is not None:
            setting = GaugeMetricFamily(
                "muai_runtime_setting",
                "Current value of each runtime setting an operator or the sidecar's tuner may change "
                "(PATCH /admin/config); a key with no value (no limit) is absent.",
                labels=["key"],
            )
            for key, value in sorted(m.settings().items()):
                setting.add_metric([key], value)
            yield setting
        throughput = GaugeMetricFamily(
            "muai_throughput_requests_per_second",
            f"Completed requests per second over the last {THROUGHPUT_WINDOW_S:g} s (rate() of muai_requests_total gives any window).",
            labels=["model"],
        )
        for model, value in sorted(m.throughput.items()):
            throughput.add_metric([model], value)
        yield throughput


class ServerMetrics:
    """Every metric of the orchestrator process, on one registry (a fresh one per app unless given).

    The server calls :meth:`model` once per (model, engine) and keeps the :class:`ModelMetrics`; hooks
    (:meth:`on_model_event`, :meth:`on_batch`, :meth:`on_fallback`) are what the model manager calls.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        on_problem: Callable[[str, str | None], None] | None = None,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self._on_problem = on_problem
        r = self.registry
        me = ["model", "engine"]
        self.running = Gauge("muai_requests_running", "Requests inside the engine layer now.", ["model"], registry=r)
        self.waiting = Gauge("muai_requests_waiting", "Admitted requests waiting for a running slot.", ["model"], registry=r)
        self.model_load = Histogram(
            "muai_model_load_seconds", "Time to load a model on an engine.", me, registry=r, buckets=LOAD_BUCKETS,
        )
        self.lifecycle = Counter(
            "muai_model_lifecycle_events", "Model lifecycle events (load_start, load_ok, load_fail, unload).",
            ["model", "event"], registry=r,
        )
        self.model_loaded = Gauge("muai_model_loaded", "1 while the model is loaded on the engine, else 0.", me, registry=r)
        self.fallbacks = Counter(
            "muai_engine_fallbacks", "Engine fallbacks taken, by model, from/to engine and reason.",
            ["model", "from", "to", "reason"], registry=r,
        )
        self.rejected = Counter(
            "muai_rejected_requests", "Requests refused before running, by reason.", ["reason"], registry=r,
        )
        self.export_failures = Counter(
            "muai_telemetry_export_failures",
            "Telemetry export calls (batches) that failed, by signal; the spans they carried are counted in "
            "muai_telemetry_spans_dropped_total{reason=\"export_failed\"}.",
            ["signal"], registry=r,
        )
        self.spans_dropped = Counter(
            "muai_telemetry_spans_dropped",
            "Spans that never reached the trace collector, by reason: queue_full (the export queue was full), "
            "export_failed (in a batch the exporter could not deliver), shutdown (ended after or queued at shutdown).",
            ["reason"], registry=r,
        )
        self.collector_errors = Counter(
            "muai_telemetry_collector_errors", "Metric samplers or collectors that raised, by component.",
            ["component"], registry=r,
        )
        self.build = Gauge("muai_server_info", "Constant 1; labels carry the server's version.", ["version"], registry=r)
        self._bound: dict[tuple[str, str], ModelMetrics] = {}
        self._loaded_engine: dict[str, str] = {}
        self._request_counts: dict[tuple[str, str, str], _Count] = {}  # (model, operation, status) as given
        self._completed: dict[str, int] = {}
        self._windows: dict[str, ThroughputWindow] = {}
        self.throughput: dict[str, float] = {}
        self.engine_stats: dict[str, dict[str, float]] = {}
        self.resources: ResourceSnapshot | None = None
        self.settings: Callable[[], dict[str, float]] | None = None
        self._problems_logged: set[str] = set()
        self._lock = threading.Lock()
        self.rejected_children = {reason: self.rejected.labels(reason) for reason in REJECT_REASONS}
        self.export_failures_traces = self.export_failures.labels("traces")
        self._spans_dropped = {reason: self.spans_dropped.labels(reason) for reason in SPAN_DROP_REASONS}
        self.registry.register(_RequestCollector(self))
        self.registry.register(_SnapshotCollector(self))
        try:
            from importlib.metadata import version

            self.build.labels(version("muai")).set(1)
        except Exception:
            self.build.labels("unknown").set(1)

    # --- request path -------------------------------------------------------------------------------------

    def model(self, model: str, engine: str) -> ModelMetrics:
        """The bound children of (model, engine); created on first use and kept."""
        key = (model, engine)
        bound = self._bound.get(key)
        if bound is None:
            with self._lock:
                bound = self._bound.get(key)
                if bound is None:
                    bound = self._bound[key] = ModelMetrics(_label(model), _label(engine))
        return bound

    def request_done(self, model: str, operation: str, status: str) -> None:
        key = (model, operation, status)
        with self._lock:
            count = self._request_counts.get(key)
            if count is None:
                count = self._request_counts[key] = _Count((_label(model), operation, status))
            count.value += 1
            self._completed[model] = self._completed.get(model, 0) + 1

    def reject(self, reason: str) -> None:
        child = self.rejected_children.get(reason)
        if child is None:
            child = self.rejected_children[reason] = self.rejected.labels(_label(reason))
        child.inc()

    def trace_export_failed(self, spans: int) -> None:
        """One export call (a batch of ``spans`` spans) failed: a failure, and that many spans dropped."""
        self.export_failures_traces.inc()
        self.on_spans_dropped(spans, "export_failed")

    def on_spans_dropped(self, count: int, reason: str) -> None:
        """``count`` spans lost for ``reason`` (``SPAN_DROP_REASONS``); thread safe (the export worker calls it)."""
        if count <= 0:
            return
        child = self._spans_dropped.get(reason)
        if child is None:
            child = self.spans_dropped.labels(_label(reason))
        child.inc(count)

    def bind_queue_gauges(self, model: str, waiting: Callable[[], float], running: Callable[[], float]) -> None:
        """Queue depth and running requests of ``model`` are read from the admission state at scrape time."""
        self.waiting.labels(_label(model)).set_function(waiting)
        self.running.labels(_label(model)).set_function(running)

    # --- hooks the model manager calls ----------------------------------------------------------------------

    def on_batch(self, model: str, engine: str, size: int) -> None:
        self.model(model, engine).on_batch(size)

    def on_fallback(self, model: str, from_engine: str, to_engine: str, reason: str) -> None:
        self.fallbacks.labels(_label(model), _label(from_engine), _label(to_engine), _label(reason)).inc()
        if to_engine:
            self._set_loaded(model, to_engine)

    def on_lifecycle(self, model: str, event: str, *, engine: str | None = None, duration_s: float | None = None) -> None:
        """Record a lifecycle event: ``load_start``, ``load_ok`` (with duration), ``load_fail``, ``unload``."""
        self.lifecycle.labels(_label(model), _label(event)).inc()
        if event == "load_ok":
            if engine and duration_s is not None:
                self.model_load.labels(_label(model), _label(engine)).observe(max(0.0, duration_s))
            if engine:
                self._set_loaded(model, engine)
        elif event in ("unload", "load_fail"):
            self._set_loaded(model, None)

    def _set_loaded(self, model: str, engine: str | None) -> None:
        previous = self._loaded_engine.get(model)
        if previous is not None and previous != engine:
            self.model_loaded.labels(_label(model), _label(previous)).set(0)
        if engine is None:
            self._loaded_engine.pop(model, None)
        else:
            self._loaded_engine[model] = engine
            self.model_loaded.labels(_label(model), _label(engine)).set(1)

    # --- background ----------------------------------------------------------------------------------------

    def sample_throughput(self, now: float) -> None:
        for model, total in list(self._completed.items()):
            window = self._windows.get(model)
            if window is None:
                window = self._windows[model] = ThroughputWindow()
            window.sample(now, total)
            self.throughput[model] = window.rate(now)

    def set_resources(self, snapshot: ResourceSnapshot) -> None:
        self.resources = snapshot

    def set_engine_stats(self, model: str, stats: Mapping[str, Any]) -> None:
        self.engine_stats[_label(model)] = normalise_engine_stats(stats)

    def sampler_failed(self, component: str, exc: BaseException) -> None:
        """A background sampler raised: count it, log the first time, report to health."""
        self.collector_errors.labels(_label(component)).inc()
        if component not in self._problems_logged:
            self._problems_logged.add(component)
            log.warning("metrics %s failed (logged once; serving goes on): %r", component, exc)
        if self._on_problem is not None:
            self._on_problem(f"metrics:{component}", f"metrics {component} failing: {type(exc).__name__}: {exc}")

    def sampler_ok(self, component: str) -> None:
        if component in self._problems_logged:
            self._problems_logged.discard(component)
            log.info("metrics %s recovered", component)
        if self._on_problem is not None:
            self._on_problem(f"metrics:{component}", None)



__all__ = [
    "BATCH_SIZE_BUCKETS",
    "LATENCY_BUCKETS",
    "LIFECYCLE_EVENTS",
    "OPERATIONS",
    "QUEUE_BUCKETS",
    "REJECT_REASONS",
    "SPAN_DROP_REASONS",
    "STATUSES",
    "TPOT_BUCKETS",
    "TTFT_BUCKETS",
    "TUNABLE_SETTINGS",
    "ModelMetrics",
    "ResourceSampler",
    "ResourceSnapshot",
    "ServerMetrics",
    "ThroughputWindow",
    "normalise_engine_stats",
    "runtime_settings",
]
