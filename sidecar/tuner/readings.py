"""What the tuner reads and what it decides: the knobs, the readings of one tick, decisions and observations.

Plain frozen dataclasses; the policy (``sidecar.tuner.policy``) and the learned table (``sidecar.tuner.learned``)
work on them, the shell (``sidecar.tuner.shell``) fills them from the sidecar and the orchestrator.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

QUEUE_CAPACITY = "server.queue_capacity"
MAX_BATCH = "batching.max_batch_size"
BATCH_TIMEOUT = "batching.batch_timeout_s"
KV_BUDGET = "kv_cache.budget_bytes"
RUNNING_LIMIT = "server.max_running_per_model"
MAX_QUEUE_WAIT = "server.max_queue_wait_s"

KNOBS: tuple[str, ...] = (QUEUE_CAPACITY, MAX_QUEUE_WAIT, MAX_BATCH, BATCH_TIMEOUT, KV_BUDGET, RUNNING_LIMIT)
NULLABLE_KNOBS = frozenset({RUNNING_LIMIT, MAX_QUEUE_WAIT})
"""Knobs whose unset value (None) means "off" and is a setting like any other."""
INTEGER_KNOBS = frozenset({QUEUE_CAPACITY, MAX_BATCH, KV_BUDGET, RUNNING_LIMIT})

# Why a knob moved; the metric label and the log line use these words.
SLO_BREACH = "slo_breach"
QUEUE_WAIT = "queue_wait"
HEADROOM = "headroom"
BATCH_WINDOW = "batch_window"
CACHE_EVICTIONS = "cache_evictions"
MEMORY_PRESSURE = "memory_pressure"
LEARNED = "learned"
ROLLBACK = "rollback"
REASONS = (SLO_BREACH, QUEUE_WAIT, HEADROOM, BATCH_WINDOW, CACHE_EVICTIONS, MEMORY_PRESSURE, LEARNED, ROLLBACK)

Source = Literal["static", "tuned", "learned", "rollback"]
Value = float | int | None


@dataclass(frozen=True, slots=True)
class Bounds:
    """Hard limits of one knob and how far one tick may move it.

    One step may multiply or divide the value by at most ``max_step_ratio``, or move it by ``min_step`` where that
    is more (so a value near zero can still move).
    """

    lo: float
    hi: float
    max_step_ratio: float = 2.0
    min_step: float = 0.0

    def __post_init__(self) -> None:
        if not self.lo <= self.hi:
            raise ValueError(f"bounds: lo ({self.lo}) must not exceed hi ({self.hi})")
        if self.max_step_ratio < 1:
            raise ValueError(f"bounds: max_step_ratio must be at least 1, got {self.max_step_ratio}")
        if self.min_step < 0:
            raise ValueError(f"bounds: min_step must not be negative, got {self.min_step}")

    def step_range(self, old: float) -> tuple[float, float]:
        """The values one tick may reach from ``old`` (before the hard bounds are applied)."""
        down = max(old - old / self.max_step_ratio, self.min_step)
        up = max(old * self.max_step_ratio - old, self.min_step)
        return old - down, old + up

    def clamp(self, old: float | None, wanted: float, *, integer: bool) -> float:
        """``wanted`` limited to one step from ``old`` and to the bounds; integers stay inside both."""
        low, high = self.lo, self.hi
        if old is not None:
            s_low, s_high = self.step_range(old)
            low, high = max(low, s_low), min(high, s_high)
            if low > high:  # old lies outside the bounds: step towards them
                low = high = self.lo if old < self.lo else self.hi
        if integer:
            low, high = math.ceil(low - 1e-9), math.floor(high + 1e-9)
            if low > high:
                return float(round(old)) if old is not None else float(math.ceil(self.lo))
            return float(min(max(round(wanted), low), high))
        return min(max(wanted, low), high)


@dataclass(frozen=True, slots=True)
class ModelReading:
    """What the sidecar's windows say of one model's admitted requests over the tuner's window."""

    model: str
    slo_p99_s: float
    requests_per_s: float
    p99_s: float = math.nan
    p50_s: float = math.nan
    attainment: float = math.nan
    """Share of the window's requests that finished within ``slo_p99_s`` (NaN with no requests)."""
    ttft_p99_s: float = math.nan
    slo_ttft_s: float | None = None
    error_ratio: float = 0.0
    waiting: int = 0
    running: int = 0
    mean_input_tokens: float = math.nan
    continuous_batching: bool = False
    fresh_requests: float = 0.0
    """Requests of the model the orchestrator finished since the last tick, by its latency histogram."""
    fresh_p99_s: float = math.nan
    """p99 of those requests, interpolated within the histogram's buckets (NaN with none)."""
    fresh_queue_p99_s: float = math.nan
    """p99 of the time those requests waited for a running slot (``muai_request_queue_seconds``)."""
    fresh_attainment: float = math.nan
    """Share of those requests that finished within ``slo_p99_s`` (NaN with none).

    The windows see a request once its span is exported (seconds later) and average over the whole window; the
    fresh figures describe only the requests that ended since the last tick, so a change shows in them within a
    tick."""

    def fresh(self, least: float = 20.0) -> bool:
        """Enough requests finished since the last tick for the fresh figures to mean something."""
        return self.fresh_requests >= least and not math.isnan(self.fresh_p99_s)


@dataclass(frozen=True, slots=True)
class Readings:
    """One tick's inputs: the models' windows, the orchestrator's settings and counters, the host."""

    models: tuple[ModelReading, ...]
    settings: Mapping[str, Value]
    rejected_per_s: float = 0.0
    served_per_s: float = math.nan
    """Requests the orchestrator finished per second since the last tick, by its own counter (NaN when unknown):
    fresher than the windows, which see a request only once its span has been exported."""
    kv_evictions_per_s: float = 0.0
    kv_bytes: float = 0.0
    memory_available_bytes: float | None = None
    memory_total_bytes: float | None = None
    gpu_memory_used_ratio: float | None = None
    """The fullest GPU's framebuffer in use, 0 to 1 (NVML); None without a GPU."""

    @property
    def completed_per_s(self) -> float:
        return sum(m.requests_per_s for m in self.models)

    @property
    def offered_per_s(self) -> float:
        return self.completed_per_s + self.rejected_per_s

    @property
    def goodput_per_s(self) -> float:
        return sum(m.requests_per_s * m.attainment for m in self.models if not math.isnan(m.attainment))

    @property
    def in_flight(self) -> int:
        return sum(m.waiting + m.running for m in self.models)

    def summary(self) -> dict[str, float | int | None]:
        """The figures a decision is logged with."""
        worst = worst_model(self.models)
        fresh = fresh_worst(self.models)
        return {
            "offered_rps": round(self.offered_per_s, 3),
            "goodput_rps": round(self.goodput_per_s, 3),
            "rejected_rps": round(self.rejected_per_s, 3),
            "in_flight": self.in_flight,
            "p99_s": None if worst is None or math.isnan(worst.p99_s) else round(worst.p99_s, 4),
            "slo_p99_s": None if worst is None else worst.slo_p99_s,
            "attainment": None if worst is None or math.isnan(worst.attainment) else round(worst.attainment, 4),
            "fresh_p99_s": None if fresh is None else round(fresh.fresh_p99_s, 4),
            "fresh_attainment": None if fresh is None else round(fresh.fresh_attainment, 4),
        }


@dataclass(frozen=True, slots=True)
class Decision:
    """One knob moved: from ``old`` to ``new``, why, and what the tuner saw."""

    at: float
    knob: str
    old: Value
    new: Value
    reason: str
    source: Source
    load_level: str
    readings: Mapping[str, float | int | None] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return {"at": self.at, "knob": self.knob, "old": self.old, "new": self.new, "reason": self.reason,
                "source": self.source, "load_level": self.load_level, "readings": dict(self.readings)}


@dataclass(frozen=True, slots=True)
class Observation:
    """One tick as history: at this load level these settings gave this goodput."""

    at: float
    load_level: str
    settings: Mapping[str, Value]
    goodput_per_s: float
    attainment: float
    offered_per_s: float


def histogram_delta(now: Mapping[float, float], before: Mapping[float, float]) -> list[tuple[float, float]]:
    """Cumulative bucket counts (upper bound -> count, ``inf`` included) gained since ``before``, sorted by bound.

    A counter that went down (the orchestrator restarted) reads as starting again from zero."""
    out = []
    reset = any(now.get(le, 0.0) < c for le, c in before.items())
    for le in sorted(now):
        gained = now[le] - (0.0 if reset else before.get(le, 0.0))
        out.append((le, max(0.0, gained)))
    return out


def histogram_share_within(buckets: list[tuple[float, float]], limit: float) -> float:
    """Share of a cumulative histogram's observations at or below ``limit``, linear within the bucket it falls in
    (NaN when empty)."""
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return math.nan
    lower, below = 0.0, 0.0
    for le, count in buckets:
        if limit <= le:
            if math.isinf(le):
                return below / total
            return (below + (count - below) * (limit - lower) / (le - lower)) / total
        lower, below = le, count
    return 1.0


def histogram_quantile(buckets: list[tuple[float, float]], q: float) -> float:
    """The ``q`` quantile of a cumulative histogram, linear within its bucket as Prometheus's
    ``histogram_quantile`` reads it (the highest finite bound when it falls in the ``+Inf`` bucket; NaN when empty)."""
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return math.nan
    rank = q * total
    lower, below = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return lower
            inside = count - below
            return lower + (le - lower) * ((rank - below) / inside if inside > 0 else 1.0)
        lower, below = le, count
    return lower


def worst_model(models: Iterable[ModelReading]) -> ModelReading | None:
    """The model closest to (or furthest past) its objective, among those with traffic."""
    busy = [m for m in models if m.requests_per_s > 0 and not math.isnan(m.p99_s)]
    if not busy:
        return None
    return max(busy, key=lambda m: m.p99_s / m.slo_p99_s)


def fresh_worst(models: Iterable[ModelReading]) -> ModelReading | None:
    """The model furthest past its objective by the requests finished since the last tick (enough of them)."""
    return max((m for m in models if m.fresh()), key=lambda m: m.fresh_p99_s / m.slo_p99_s, default=None)


def worst_slo(readings: Readings) -> float:
    """The tightest p99 objective among the models with traffic (inf without traffic)."""
    return min((m.slo_p99_s for m in readings.models if m.requests_per_s > 0), default=math.inf)


def ttft_breach(m: ModelReading) -> bool:
    return m.slo_ttft_s is not None and not math.isnan(m.ttft_p99_s) and m.ttft_p99_s > m.slo_ttft_s


__all__ = [
    "BATCH_TIMEOUT", "BATCH_WINDOW", "CACHE_EVICTIONS", "HEADROOM", "INTEGER_KNOBS", "KNOBS", "KV_BUDGET", "LEARNED",
    "MAX_BATCH", "MAX_QUEUE_WAIT", "MEMORY_PRESSURE", "NULLABLE_KNOBS", "QUEUE_CAPACITY", "QUEUE_WAIT", "REASONS",
    "ROLLBACK", "RUNNING_LIMIT", "SLO_BREACH", "Bounds", "Decision", "ModelReading", "Observation", "Readings",
    "Source", "Value", "fresh_worst", "histogram_delta", "histogram_quantile", "histogram_share_within",
    "ttft_breach", "worst_model", "worst_slo",
]
