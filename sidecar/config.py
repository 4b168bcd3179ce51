"""The sidecar's configuration section (``sidecar:`` in the one YAML file).

Each key is typed, bounded and documented; unknown keys are refused. Keys marked ``runtime`` (via
``json_schema_extra={"runtime": True}``) may be changed while running; every other key needs a restart.
The loader in ``muai/config.py`` composes :class:`SidecarConfig` as the field ``sidecar`` and maps environment
variables (``MUAI_SIDECAR__PORT``, ``MUAI_SIDECAR__DETECTORS__LATENCY__THRESHOLD_S`` ...) onto it.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from sidecar._section import Section
from sidecar.tls import insecure_admin_problem
from sidecar.tuner.config import TunerConfig

RUNTIME = {"runtime": True}

DEFAULT_PORT = 9464
"""The sidecar's default listen port; the orchestrator's tracing endpoint and Prometheus examples point at it."""

DEFAULT_OTLP_GRPC_PORT = 4317
"""OTLP/gRPC's standard port, where SDKs and vLLM export by default."""

_WINDOW_NAME = re.compile(r"^[A-Za-z0-9_]{1,16}$")
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")

# Labels are part of an alert's fingerprint: a label changed while an alert fires would leave the old alert
# firing for ever, so label-forming keys are never runtime.
_SEVERITY = "`severity` label of the alert (a label, so it needs a restart)."


# --- collectors ---------------------------------------------------------------------------------------------


class GpuCollectorConfig(Section):
    """NVML per-GPU sampling (nvidia-ml-py)."""

    enabled: bool = Field(True, description="Sample GPUs through NVML; with no driver the sidecar says 'no GPU' once and goes on.")
    processes: bool = Field(True, description="Also read per-process GPU memory where the driver allows it.")


class HostCollectorConfig(Section):
    """psutil host sampling: CPU, memory, and the orchestrator process."""

    enabled: bool = Field(True, description="Sample host CPU and memory and the orchestrator process.")


class OrchestratorTargetConfig(Section):
    """How the sidecar finds the orchestrator process it watches."""

    pid_file: str | None = Field(None, description="PID file the orchestrator writes (`server.pid_file`); tried first.")
    url: str | None = Field(
        "http://127.0.0.1:8000",
        pattern=r"^https?://",
        description="The orchestrator's base URL; its port finds the process when no PID file is set or readable.",
    )
    ca_file: str | None = Field(
        None, description="PEM CA bundle that verifies the orchestrator's certificate when `url` is https (the tuner's "
        "client); unset: the system's trust store.",
    )


class CollectorsConfig(Section):
    """Resource collectors."""

    interval_s: float = Field(5.0, ge=0.01, le=3600, description="How often GPU and host metrics are sampled.")
    gpu: GpuCollectorConfig = GpuCollectorConfig()
    host: HostCollectorConfig = HostCollectorConfig()
    orchestrator: OrchestratorTargetConfig = OrchestratorTargetConfig()


# --- monitor ------------------------------------------------------------------------------------------------


class MonitorConfig(Section):
    """The rolling windows behind /api/v1/stats and the derived Prometheus series."""

    windows: dict[str, float] = Field(
        {"10s": 10.0, "1m": 60.0, "5m": 300.0},
        min_length=1,
        max_length=8,
        description="Window name -> horizon in seconds; every statistic is kept over each window.",
    )
    max_samples: int = Field(
        20_000, ge=16, le=10_000_000,
        description="Samples one window of one series keeps exactly; past it the oldest fold into a sketch with 1% "
        "relative error (percentiles then carry that bound). Memory per series and window stays under ~16 bytes each.",
    )
    max_series: int = Field(
        256, ge=1, le=100_000,
        description="Most (model, operation) series tracked; spans of further series are counted but not tracked.",
    )

    @field_validator("windows")
    @classmethod
    def _windows(cls, value: dict[str, float]) -> dict[str, float]:
        for name, horizon in value.items():
            if not _WINDOW_NAME.match(name):
                raise ValueError(f"window name {name!r} must be 1-16 letters, digits or underscores")
            if not 0 < horizon <= 86_400:
                raise ValueError(f"window {name!r} horizon {horizon} must be in (0, 86400] seconds")
        return value


# --- receiver and forwarding ---------------------------------------------------------------------------------


class ReceiverConfig(Section):
    """The OTLP/HTTP span receiver at /v1/traces."""

    max_body_bytes: int = Field(
        8 * 1024**2, ge=1024, le=1024**3, description="Largest request body as sent (compressed); larger gets 413."
    )
    max_decompressed_bytes: int = Field(
        64 * 1024**2, ge=1024, le=4 * 1024**3, description="Largest body after gzip; larger gets 413 (guards against gzip bombs)."
    )


class ForwardingConfig(Section):
    """Re-export every received span batch to another OTLP/HTTP endpoint (e.g. a tracing backend)."""

    endpoint: str | None = Field(
        None, pattern=r"^https?://", description="Full OTLP/HTTP traces URL (`.../v1/traces`); unset turns forwarding off."
    )
    timeout_s: float = Field(10.0, gt=0, le=300, description="Timeout of one forwarded export.")
    queue_size: int = Field(
        256, ge=1, le=100_000, description="Batches waiting to be forwarded; when full new ones are dropped and counted."
    )
    queue_bytes: int = Field(
        64 * 1024**2, ge=1024, le=4 * 1024**3,
        description="Bytes of batches waiting to be forwarded; a batch that would pass it is dropped and counted.",
    )
    compression: Literal["gzip", "none"] = Field("gzip", description="Content-Encoding of forwarded batches.")
    headers: dict[str, str] = Field({}, description="Extra HTTP headers on every forwarded export (e.g. auth).")


# --- detectors ----------------------------------------------------------------------------------------------


class LatencyRuleConfig(Section):
    """Fire when a latency percentile of a series stays above a threshold (10.1)."""

    enabled: bool = Field(True, description="Evaluate this rule.", json_schema_extra=RUNTIME)
    quantile: Literal["p50", "p95", "p99"] = Field("p95", description="Which percentile is compared.", json_schema_extra=RUNTIME)
    threshold_s: float = Field(2.0, gt=0, description="Latency in seconds above which the rule is breached.", json_schema_extra=RUNTIME)
    for_s: float = Field(30.0, ge=0, description="How long the breach must last before the alert fires.", json_schema_extra=RUNTIME)
    keep_firing_for_s: float = Field(
        0.0, ge=0, description="A firing alert keeps firing until the value has been clear this long (anti-flap).",
        json_schema_extra=RUNTIME,
    )
    min_count: int = Field(
        5, ge=1,
        description="Fewest requests in the window for the rule to judge; with fewer it keeps its state (a firing alert "
        "stays firing). A model that stops answering is `throughput`'s to report.",
        json_schema_extra=RUNTIME,
    )
    severity: str = Field("warning", min_length=1, description=_SEVERITY)


class ErrorRateRuleConfig(Section):
    """Fire when the error ratio of a series stays above a threshold (10.2)."""

    enabled: bool = Field(True, description="Evaluate this rule.", json_schema_extra=RUNTIME)
    threshold: float = Field(0.05, ge=0, le=1, description="Error ratio (0-1) above which the rule is breached.", json_schema_extra=RUNTIME)
    for_s: float = Field(60.0, ge=0, description="How long the breach must last before the alert fires.", json_schema_extra=RUNTIME)
    min_count: int = Field(
        10, ge=1, description="Fewest requests in the window for the rule to judge; with fewer it keeps its state.",
        json_schema_extra=RUNTIME,
    )
    severity: str = Field("critical", min_length=1, description=_SEVERITY)


class MemoryRuleConfig(Section):
    """Fire when memory use stays above a percentage (10.3)."""

    enabled: bool = Field(True, description="Evaluate this rule.", json_schema_extra=RUNTIME)
    threshold_percent: float = Field(95.0, gt=0, le=100, description="Percent of memory in use above which the rule is breached.", json_schema_extra=RUNTIME)
    for_s: float = Field(120.0, ge=0, description="How long the breach must last before the alert fires.", json_schema_extra=RUNTIME)
    severity: str = Field("warning", min_length=1, description=_SEVERITY)


class ThroughputRuleConfig(Section):
    """Fire when a series' request rate stays below a floor (10.4); off until a floor is set."""

    threshold_rps: float | None = Field(
        None, ge=0, description="Requests per second below which the rule is breached; unset turns the rule off.",
        json_schema_extra=RUNTIME,
    )
    for_s: float = Field(120.0, ge=0, description="How long the breach must last before the alert fires.", json_schema_extra=RUNTIME)
    severity: str = Field("warning", min_length=1, description=_SEVERITY)


class EwmaConfig(Section):
    """EWMA with a z-score band on each series' interval p95 latency."""

    enabled: bool = Field(True, description="Run this detector.", json_schema_extra=RUNTIME)
    alpha: float = Field(0.01, gt=0, le=1, description="Smoothing factor of the moving mean and variance.", json_schema_extra=RUNTIME)
    z_threshold: float = Field(3.5, gt=0, description="z-score beyond which a point is anomalous.", json_schema_extra=RUNTIME)
    warmup: int = Field(100, ge=2, le=100_000, description="Points that only build the baseline (no verdict).", json_schema_extra=RUNTIME)
    smoothing: float = Field(
        0.05, gt=0, le=1,
        description="EWMA control chart factor: the point judged is an EWMA of recent points with this factor, against a "
        "band narrowed to match; below 1 it finds small lasting rises sooner. 1 judges each point alone.",
        json_schema_extra=RUNTIME,
    )
    recurring_days: int = Field(
        2, ge=0, le=30,
        description="A point judged anomalous is reported normal when the series reached that level within "
        "`recurring_window_s` of the same time of day on each of this many past days: the EWMA's mean trails a daily "
        "cycle, so every daily peak would page. 0 turns the check off.",
        json_schema_extra=RUNTIME,
    )
    recurring_window_s: float = Field(
        1800.0, gt=0, lt=43_200, description="How far either side of the same time of day `recurring_days` looks.",
        json_schema_extra=RUNTIME,
    )


class MadConfig(Section):
    """Robust median / MAD detector on each series' interval p95 latency."""

    enabled: bool = Field(False, description="Run this detector.", json_schema_extra=RUNTIME)
    window: int = Field(600, ge=3, le=100_000, description="Points in the median/MAD baseline.", json_schema_extra=RUNTIME)
    z_threshold: float = Field(
        7.0, gt=0, description="Robust z-score (|x - median| / (1.4826 MAD)) beyond which a point is anomalous.",
        json_schema_extra=RUNTIME,
    )
    warmup: int = Field(100, ge=2, le=100_000, description="Points that only build the baseline (no verdict).", json_schema_extra=RUNTIME)


class CusumConfig(Section):
    """Upward CUSUM for slow rises of each series' interval p95 latency."""

    enabled: bool = Field(False, description="Run this detector.", json_schema_extra=RUNTIME)
    k: float = Field(0.5, ge=0, description="Allowance in standard deviations before drift accumulates.", json_schema_extra=RUNTIME)
    h: float = Field(12.0, gt=0, description="Decision interval in standard deviations.", json_schema_extra=RUNTIME)
    warmup: int = Field(30, ge=2, le=100_000, description="Points that estimate the reference mean and spread.", json_schema_extra=RUNTIME)


class LikelihoodConfig(Section):
    """Anomaly likelihood of each series' interval p95 latency: how unlikely its recent residuals are, judged against
    the residuals the series has shown itself (the post-processing of NAB's best published detectors)."""

    enabled: bool = Field(False, description="Run this detector.", json_schema_extra=RUNTIME)
    window: int = Field(
        288, ge=3, le=100_000, description="Points in the rolling median/MAD each point's residual is measured against.",
        json_schema_extra=RUNTIME,
    )
    short_window: int = Field(
        10, ge=1, le=10_000, description="Residuals averaged for one verdict: a lone spike moves the average a tenth as far.",
        json_schema_extra=RUNTIME,
    )
    history: int = Field(
        2000, ge=12, le=1_000_000,
        description="Averaged residuals the Gaussian is fitted to: how long the detector remembers what is usual for the series.",
        json_schema_extra=RUNTIME,
    )
    epsilon: float = Field(
        1e-3, gt=0, lt=0.5,
        description="A point is anomalous when its likelihood exceeds 1 - epsilon (the averaged residual is that far "
        "into the fitted Gaussian's upper tail).",
        json_schema_extra=RUNTIME,
    )
    scale: float = Field(
        3.0, gt=0, le=100,
        description="Robust z-score at which a residual's raw score is 1 - 1/e (raw scores are 1 - exp(-z / scale)).",
        json_schema_extra=RUNTIME,
    )
    min_z: float = Field(
        0.0, ge=0, le=100,
        description="Evidence floor: the recent residuals must also average at least this many robust sigmas above the "
        "median (as raw scores), so ordinary noise never fires after a long calm stretch; 0 no floor.",
        json_schema_extra=RUNTIME,
    )
    warmup: int = Field(
        200, ge=2, le=100_000,
        description="Points before the first verdict: 30 build the median, the rest the residuals' history.",
        json_schema_extra=RUNTIME,
    )

    @model_validator(mode="after")
    def _warmup_fits(self) -> LikelihoodConfig:
        if self.warmup <= 30 + self.short_window:
            raise ValueError(f"warmup ({self.warmup}) must exceed 30 + short_window ({30 + self.short_window})")
        if self.history < self.short_window + 2:
            raise ValueError(f"history ({self.history}) must be at least short_window + 2 ({self.short_window + 2})")
        return self


class NoveltyConfig(Section):
    """A new maximum: a point above the largest of a long history of the series' interval p95 latency by a margin of
    that history's upper range (its maximum minus its median), so a daily peak, already in the history, never pages."""

    enabled: bool = Field(True, description="Run this detector.", json_schema_extra=RUNTIME)
    history_s: float = Field(
        259_200.0, gt=0, le=90 * 86_400, description="How far back the history whose maximum a point must beat reaches.",
        json_schema_extra=RUNTIME,
    )
    recent_s: float = Field(
        900.0, ge=0, le=7 * 86_400,
        description="The latest span left out of the history: an incident cannot raise its own bar, and a lasting new "
        "level is normal once it is this old.",
        json_schema_extra=RUNTIME,
    )
    margin: float = Field(
        0.35, gt=0, le=100,
        description="How far above the history's maximum a point must be, in units of the history's maximum minus its "
        "median (on log latency).",
        json_schema_extra=RUNTIME,
    )
    scale: Literal["range", "mad"] = Field(
        "range",
        description="The unit of `margin`: `range`, the history's maximum minus its median; `mad`, its robust standard "
        "deviation within each slice (1.4826 MAD).",
        json_schema_extra=RUNTIME,
    )
    direction: Literal["up", "both"] = Field(
        "both",
        description="`up`: only a new maximum pages; `both`: also a new minimum, a point below the history's lowest by "
        "`margin` x its median minus its minimum (a p95 far below anything in days: requests failing fast).",
        json_schema_extra=RUNTIME,
    )
    min_history_s: float = Field(
        86_400.0, ge=0, le=90 * 86_400,
        description="The span the history must cover before the first verdict (a day: one daily cycle seen).",
        json_schema_extra=RUNTIME,
    )
    for_s: float = Field(
        0.0, ge=0,
        description="This detector's own `for` delay (instead of `statistical.for_s`): a point that beats days of history "
        "by the margin is evidence enough on its own, and the spikes it exists for last one interval.",
        json_schema_extra=RUNTIME,
    )

    @model_validator(mode="after")
    def _history_fits(self) -> NoveltyConfig:
        if self.min_history_s > self.history_s:
            raise ValueError(f"min_history_s ({self.min_history_s:g}) must not exceed history_s ({self.history_s:g})")
        return self


class StatisticalConfig(Section):
    """Detectors that need no hand-set threshold; what they flag becomes a `LatencyAnomaly` alert per detector.

    Each is fed one point per series per `interval_s`: the p95 latency of the requests that finished in that
    interval, so points never share requests (a sliding window's p95, read every tick, would repeat the same
    noise dozens of times). They judge the logarithm of latency, and only a rise is anomalous: a model getting
    faster is good news. Warm-up and MAD window are counted in points.
    """

    interval_s: float = Field(
        10.0, gt=0, le=3600, description="Length of the non-overlapping interval one point summarises.", json_schema_extra=RUNTIME
    )
    min_rel_spread: float = Field(
        0.1, gt=0, le=10,
        description="Floor of the spread the detectors divide by, as a fraction of the baseline (0.1: a p95 within 10% "
        "of normal is never more than one sigma off).",
        json_schema_extra=RUNTIME,
    )
    for_s: float = Field(
        10.0, ge=0, description="How long verdicts must stay anomalous (no normal point between) before the alert fires.",
        json_schema_extra=RUNTIME,
    )
    clear_after_s: float = Field(
        14400.0, ge=0, description="An anomaly alert resolves after this long with no anomalous verdict.", json_schema_extra=RUNTIME
    )
    repeat_hold_s: float = Field(
        28800.0, ge=0,
        description="One page per incident: no anomaly alert of a series starts firing while another of that series fires, "
        "nor for this long after one resolved (its anomalous points count as normal meanwhile). 0: only while another fires.",
        json_schema_extra=RUNTIME,
    )
    repeat_raise: float = Field(
        0.2, ge=0, le=10,
        description="Each page a detector sent on a series in the last `repeat_window_s` raises its threshold there by "
        "this fraction: a detector that keeps paging on one series is tuned too tight for it (not the likelihood "
        "detector, whose threshold is a probability). 0 turns it off.",
        json_schema_extra=RUNTIME,
    )
    repeat_window_s: float = Field(
        604_800.0, gt=0, le=90 * 86_400, description="How long a page counts towards `repeat_raise`.",
        json_schema_extra=RUNTIME,
    )
    min_count: int = Field(
        5, ge=1,
        description="Fewest requests behind one point; a quieter interval is merged with the next ones (for at most "
        "`detectors.window`).",
        json_schema_extra=RUNTIME,
    )
    adapt_after: int | None = Field(
        24, ge=1, description="Accept a lasting shift as the new normal after this many anomalous points in a row; unset never.",
        json_schema_extra=RUNTIME,
    )
    clip_anomalies: bool = Field(
        True, description="EWMA and MAD let anomalous points into their baseline clipped to the band's edge, so a lasting "
        "shift is absorbed gradually while a spike barely moves it.",
        json_schema_extra=RUNTIME,
    )
    severity: str = Field("warning", min_length=1, description=_SEVERITY)
    ewma: EwmaConfig = EwmaConfig()
    mad: MadConfig = MadConfig()
    cusum: CusumConfig = CusumConfig()
    likelihood: LikelihoodConfig = LikelihoodConfig()
    novelty: NoveltyConfig = NoveltyConfig()


class DetectorsConfig(Section):
    """Anomaly detection, evaluated on the monitor's windows on every tick."""

    enabled: bool = Field(True, description="Evaluate detectors and raise alerts.")
    interval_s: float = Field(1.0, ge=0.01, le=600, description="Evaluation tick.")
    window: str = Field("1m", description="Which `monitor.windows` entry the rules and detectors read.", json_schema_extra=RUNTIME)
    latency: LatencyRuleConfig = LatencyRuleConfig()
    error_rate: ErrorRateRuleConfig = ErrorRateRuleConfig()
    gpu_memory: MemoryRuleConfig = MemoryRuleConfig()
    host_memory: MemoryRuleConfig = MemoryRuleConfig()
    throughput: ThroughputRuleConfig = ThroughputRuleConfig()
    statistical: StatisticalConfig = StatisticalConfig()


# --- alerting -----------------------------------------------------------------------------------------------


class LogSinkConfig(Section):
    """One structured log line per notification."""

    enabled: bool = Field(True, description="Log every notification.")


class WebhookSinkConfig(Section):
    """POST Alertmanager-shaped (version 4) payloads to a webhook."""

    url: str | None = Field(None, pattern=r"^https?://", description="Webhook URL; unset turns the sink off.")
    secret: str | None = Field(None, min_length=8, description="HMAC-SHA256 key; when set each payload is signed.")
    timeout_s: float = Field(5.0, gt=0, le=120, description="Timeout of one delivery attempt.")
    retries: int = Field(5, ge=0, le=100, description="Retries after a failed attempt (exponential back-off with jitter).")
    buffer: int = Field(1000, ge=1, le=1_000_000, description="Notifications waiting for delivery; past it the oldest are dropped and counted.")


class AlertmanagerSinkConfig(Section):
    """POST alerts to Alertmanager's API v2 (`/api/v2/alerts`)."""

    url: str | None = Field(
        None, pattern=r"^https?://", description="Alertmanager base URL (e.g. http://127.0.0.1:9093); unset turns the sink off."
    )
    resend_interval_s: float = Field(
        60.0, gt=0, le=3600, description="Firing alerts are re-posted this often so they never lapse in Alertmanager."
    )
    timeout_s: float = Field(5.0, gt=0, le=120, description="Timeout of one post.")
    retries: int = Field(3, ge=0, le=100, description="Retries after a failed post.")
    buffer: int = Field(1000, ge=1, le=1_000_000, description="Notifications waiting for delivery; past it the oldest are dropped and counted.")


class SinksConfig(Section):
    """Where notifications go (10.5)."""

    log: LogSinkConfig = LogSinkConfig()
    webhook: WebhookSinkConfig = WebhookSinkConfig()
    alertmanager: AlertmanagerSinkConfig = AlertmanagerSinkConfig()


class RateLimitConfig(Section):
    """Storm control (10.6) for the log and webhook sinks: Alertmanager-like grouping plus a token bucket per sink.

    Alertmanager itself groups and repeats on its own; its sink only re-posts firing alerts
    (``sinks.alertmanager.resend_interval_s``).

    Not runtime: every sink's dispatcher builds its throttle (groups, their timers, the bucket) from these at start,
    and changing them under live groups would have to drop or re-time those groups; they take a restart.
    """

    group_by: list[str] = Field(
        ["alertname"], description="Labels that define a notification group (`...` alone: every alert on its own).",
    )
    group_wait_s: float = Field(
        1.0, ge=0, le=3600, description="A new group waits this long for company before its first notification.",
    )
    group_interval_s: float = Field(
        30.0, gt=0, le=86_400, description="A group that changed is notified again at most this often."
    )
    repeat_interval_s: float = Field(
        3600.0, gt=0, le=7 * 86_400, description="A group that keeps firing unchanged is re-notified this often.",
    )
    rate_per_s: float = Field(
        0.2, gt=0, le=1000, description="Token bucket refill: notifications per second across all groups, per sink.",
    )
    burst: int = Field(10, ge=1, le=100_000, description="Token bucket size: notifications one sink may send in a burst.")

    @field_validator("group_by")
    @classmethod
    def _label_names(cls, value: list[str]) -> list[str]:
        if "..." in value and len(value) > 1:
            raise ValueError("group_by '...' must stand alone")
        for name in value:
            if name != "..." and not _LABEL_NAME.match(name):
                raise ValueError(f"group_by entry {name!r} is not a valid label name")
        return value

    @model_validator(mode="after")
    def _intervals(self) -> RateLimitConfig:
        if self.repeat_interval_s < self.group_interval_s:
            raise ValueError(
                f"rate_limit.repeat_interval_s ({self.repeat_interval_s}) must be >= rate_limit.group_interval_s "
                f"({self.group_interval_s})"
            )
        return self


class AlertingConfig(Section):
    """Alert lifecycle, rate limiting and sinks."""

    external_labels: dict[str, str] = Field(
        {}, description="Labels added to every alert (e.g. cluster); keep them equal across sidecars so Alertmanager dedups."
    )
    history_size: int = Field(500, ge=0, le=100_000, description="Resolved alerts kept for /api/v1/alerts.")
    sinks: SinksConfig = SinksConfig()
    rate_limit: RateLimitConfig = RateLimitConfig()

    @field_validator("external_labels")
    @classmethod
    def _label_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not _LABEL_NAME.match(name):
                raise ValueError(f"external label {name!r} is not a valid label name")
        return value


class SidecarTlsConfig(Section):
    """HTTPS on the sidecar's HTTP port (OTLP/HTTP, the query API, /metrics): both files, or neither."""

    cert_file: str | None = Field(None, description="PEM certificate (chain) the sidecar presents; with `key_file`, turns HTTPS on.")
    key_file: str | None = Field(None, description="PEM private key of `cert_file`.")

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None

    @model_validator(mode="after")
    def _both_or_neither(self) -> SidecarTlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("sidecar.tls.cert_file and sidecar.tls.key_file go together: set both, or neither")
        return self


# --- the section --------------------------------------------------------------------------------------------


class SidecarConfig(Section):
    """The `sidecar` section: where the sidecar listens, what it collects, and how it detects and alerts."""

    host: str = Field("127.0.0.1", description="Listen address.")
    port: int = Field(DEFAULT_PORT, ge=1, le=65535, description="Listen port (OTLP /v1/traces, /metrics, /api/v1/*).")
    otlp_grpc_port: int | None = Field(
        DEFAULT_OTLP_GRPC_PORT, ge=0, le=65535,
        description="OTLP/gRPC receiver port on `host` (TraceService/Export, the transport most SDKs and vLLM use by "
        "default); null turns it off, 0 picks a free port. A port already taken is logged and shown on /health.",
    )
    shutdown_timeout_s: float = Field(10.0, ge=0, le=300, description="On SIGTERM, how long in-flight requests may take.")
    collectors: CollectorsConfig = CollectorsConfig()
    monitor: MonitorConfig = MonitorConfig()
    receiver: ReceiverConfig = ReceiverConfig()
    forwarding: ForwardingConfig = ForwardingConfig()
    detectors: DetectorsConfig = DetectorsConfig()
    alerting: AlertingConfig = AlertingConfig()
    tuner: TunerConfig = TunerConfig()
    tls: SidecarTlsConfig = SidecarTlsConfig()
    allow_insecure_admin: bool = Field(
        False, description="Start with `PATCH /api/v1/config` on (`tuner.admin_token` set) on a `host` beyond loopback "
        "without TLS; only behind a TLS-terminating proxy. Without it such a start is refused.",
    )

    # A field validator on the last of the fields it reads (not the model validator below): its error then shows this
    # one boolean, not the whole section with the token in it.
    @field_validator("allow_insecure_admin")
    @classmethod
    def _admin_token_stays_encrypted(cls, allowed: bool, info: ValidationInfo) -> bool:
        tuner, tls = info.data.get("tuner"), info.data.get("tls")
        problem = insecure_admin_problem(
            section="sidecar", host=info.data.get("host", "127.0.0.1"), token_key="sidecar.tuner.admin_token",
            token_set=tuner is not None and tuner.admin_token is not None, tls_on=tls is not None and tls.enabled,
            allowed=allowed,
        )
        if problem:
            raise ValueError(problem)
        return allowed

    @model_validator(mode="after")
    def _cross_fields(self) -> SidecarConfig:
        if self.otlp_grpc_port is not None and self.otlp_grpc_port == self.port:
            raise ValueError(f"sidecar.otlp_grpc_port {self.otlp_grpc_port} is the same as sidecar.port")
        if self.tuner.window not in self.monitor.windows:
            raise ValueError(
                f"sidecar.tuner.window {self.tuner.window!r} is not one of sidecar.monitor.windows "
                f"{sorted(self.monitor.windows)}"
            )
        if self.detectors.window not in self.monitor.windows:
            raise ValueError(
                f"sidecar.detectors.window {self.detectors.window!r} is not one of sidecar.monitor.windows "
                f"{sorted(self.monitor.windows)}"
            )
        return self


__all__ = [
    "DEFAULT_OTLP_GRPC_PORT",
    "DEFAULT_PORT",
    "AlertingConfig",
    "AlertmanagerSinkConfig",
    "CollectorsConfig",
    "CusumConfig",
    "DetectorsConfig",
    "ErrorRateRuleConfig",
    "EwmaConfig",
    "ForwardingConfig",
    "GpuCollectorConfig",
    "HostCollectorConfig",
    "LatencyRuleConfig",
    "LogSinkConfig",
    "MadConfig",
    "MemoryRuleConfig",
    "MonitorConfig",
    "OrchestratorTargetConfig",
    "RateLimitConfig",
    "ReceiverConfig",
    "SidecarConfig",
    "SidecarTlsConfig",
    "SinksConfig",
    "StatisticalConfig",
    "ThroughputRuleConfig",
    "TunerConfig",
    "WebhookSinkConfig",
]
