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

KNOBS: tuple[str, ...] = (QUEUE_CAPACITY, MAX_BATCH, BATCH_TIMEOUT, KV_BUDGET, RUNNING_LIMIT)
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
        return {
            "offered_rps": round(self.offered_per_s, 3),
            "goodput_rps": round(self.goodput_per_s, 3),
            "rejected_rps": round(self.rejected_per_s, 3),
            "in_flight": self.in_flight,
            "p99_s": None if worst is None or math.isnan(worst.p99_s) else round(worst.p99_s, 4),
            "slo_p99_s": None if worst is None else worst.slo_p99_s,
            "attainment": None if worst is None or math.isnan(worst.attainment) else round(worst.attainment, 4),
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


def worst_model(models: Iterable[ModelReading]) -> ModelReading | None:
    """The model closest to (or furthest past) its objective, among those with traffic."""
    busy = [m for m in models if m.requests_per_s > 0 and not math.isnan(m.p99_s)]
    if not busy:
        return None
    return max(busy, key=lambda m: m.p99_s / m.slo_p99_s)


def worst_slo(readings: Readings) -> float:
    """The tightest p99 objective among the models with traffic (inf without traffic)."""
    return min((m.slo_p99_s for m in readings.models if m.requests_per_s > 0), default=math.inf)


def ttft_breach(m: ModelReading) -> bool:
    return m.slo_ttft_s is not None and not math.isnan(m.ttft_p99_s) and m.ttft_p99_s > m.slo_ttft_s


__all__ = [
    "BATCH_TIMEOUT", "BATCH_WINDOW", "CACHE_EVICTIONS", "HEADROOM", "INTEGER_KNOBS", "KNOBS", "KV_BUDGET", "LEARNED",
    "MAX_BATCH", "MEMORY_PRESSURE", "QUEUE_CAPACITY", "QUEUE_WAIT", "REASONS", "ROLLBACK", "RUNNING_LIMIT",
    "SLO_BREACH", "Bounds", "Decision", "ModelReading", "Observation", "Readings", "Source", "Value", "ttft_breach",
    "worst_model", "worst_slo",
]
