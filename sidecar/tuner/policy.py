"""The tuner's policy: readings and ``now`` in, decisions out. No I/O, no clock, no threads.

Two loops share one object:

* **Fast** (every tick, seconds): SLO headroom moves the knobs. Admission follows Little's law: with ``X``
  requests per second completing and an objective of ``W`` seconds, at most ``X * W * admission_share`` requests
  may be inside the server at once, or the last admitted one cannot finish in time; so when the queue is what is
  slow, the queue capacity is cut to that figure at once, and while requests are turned away with latency to
  spare it grows again. The batch size grows while batches fill from the queue (with headroom, or when saturated),
  and halves when latency breaches with a short queue, full batches and a slow median (the batch's own run time is
  the latency); both are trials: a bigger batch is rolled back if goodput fell, a smaller one unless p99 fell or
  attainment rose, because a smaller batch also lowers throughput and with it what admission lets in. The batch timeout is the time in which half a batch is
  expected to arrive, never more than a small share of the objective. The KV-cache budget grows while
  conversations are evicted and memory is plentiful, and shrinks under memory pressure. In front of an engine that
  batches by itself, a breach with nothing queued lowers the running limit.
* **Slow** (learns): every tick is an observation of (load level, settings) -> goodput. Per load level the table
  keeps what each setting achieved; on entering a level it knows, the tuner moves straight to the best settings it
  has seen there, instead of waiting for a breach to teach it again.

Guardrails: hard bounds per knob, a step limit per tick, a deadband on headroom (no change while latency sits
between ``(1 - deadband) * SLO`` and the SLO), a cooldown per knob, and a trial after every change made to gain
(not to protect): if goodput or attainment falls at the same load level, the change is rolled back and that move
is barred at that level for a while.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
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
        worst = _worst(self.models)
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


@dataclass(slots=True)
class _Score:
    n: int = 0
    goodput: float = 0.0
    attainment: float = 0.0

    def add(self, goodput: float, attainment: float) -> None:
        self.n += 1
        self.goodput += (goodput - self.goodput) / self.n
        self.attainment += (attainment - self.attainment) / self.n


class LearnedTable:
    """Per load level, the mean goodput and attainment each settings signature achieved. Pure."""

    def __init__(self, *, min_samples: int = 3, attainment_target: float = 0.99) -> None:
        self.min_samples = min_samples
        self.attainment_target = attainment_target
        self._levels: dict[str, dict[tuple[tuple[str, Value], ...], _Score]] = {}

    def __len__(self) -> int:
        return sum(len(v) for v in self._levels.values())

    def levels(self) -> list[str]:
        return sorted(self._levels)

    def observe(self, obs: Observation) -> None:
        if math.isnan(obs.attainment) or math.isnan(obs.goodput_per_s):
            return
        sig = _signature(obs.settings)
        self._levels.setdefault(obs.load_level, {}).setdefault(sig, _Score()).add(obs.goodput_per_s, obs.attainment)

    def load(self, observations: Iterable[Observation]) -> int:
        n = 0
        for obs in observations:
            self.observe(obs)
            n += 1
        return n

    def best(self, level: str) -> tuple[dict[str, Value], float, float] | None:
        """The settings with the best goodput at ``level`` among those that met the attainment target (else the
        best attainment), with their mean goodput and attainment; None before ``min_samples`` ticks of any."""
        scores = [(sig, s) for sig, s in self._levels.get(level, {}).items() if s.n >= self.min_samples]
        if not scores:
            return None
        meeting = [(sig, s) for sig, s in scores if s.attainment >= self.attainment_target]
        if meeting:
            sig, score = max(meeting, key=lambda item: (item[1].goodput, item[1].n))
        else:
            sig, score = max(scores, key=lambda item: (item[1].attainment, item[1].goodput))
        return dict(sig), score.goodput, score.attainment


def _signature(settings: Mapping[str, Value]) -> tuple[tuple[str, Value], ...]:
    out = []
    for knob in KNOBS:
        if knob not in settings:
            continue
        value = settings[knob]
        if isinstance(value, float) and knob not in INTEGER_KNOBS:
            value = round(value, 4)
        out.append((knob, value))
    return tuple(out)


def load_level(readings: Readings) -> str:
    """Which load bucket a tick falls in: offered requests per second in half-octaves, prompt length in octaves.

    Coarse on purpose: the slow loop needs several ticks per bucket before it trusts what it learned there.
    """
    offered = readings.offered_per_s
    rate = "idle" if offered < 0.05 else f"{round(2 * math.log2(offered)) / 2:g}"
    lengths = [m.mean_input_tokens for m in readings.models if not math.isnan(m.mean_input_tokens) and m.requests_per_s]
    prompt = "-" if not lengths else f"{round(math.log2(max(1.0, max(lengths))))}"
    return f"rps2^{rate}/tok2^{prompt}"


def _worst(models: Iterable[ModelReading]) -> ModelReading | None:
    """The model closest to (or furthest past) its objective, among those with traffic."""
    busy = [m for m in models if m.requests_per_s > 0 and not math.isnan(m.p99_s)]
    if not busy:
        return None
    return max(busy, key=lambda m: m.p99_s / m.slo_p99_s)


@dataclass(slots=True)
class _Trial:
    """A change made to gain, under watch until ``until``."""

    until: float
    level: str
    decisions: list[Decision]
    """What was changed; their ``old`` values are the last good settings a rollback returns to."""
    goodput_ratio: float
    attainment: float
    p99_ratio: float = math.nan
    """The worst model's p99 / SLO when the change was made."""

    @property
    def remedy(self) -> bool:
        """A change made to cure a breach: it must show that it cured something, whatever the load did."""
        return any(d.reason == SLO_BREACH for d in self.decisions)


@dataclass(frozen=True, slots=True)
class TickResult:
    decisions: list[Decision]
    observation: Observation | None


class TunerPolicy:
    """The tuner's pure core. Call :meth:`tick` with each interval's readings and ``now``.

    ``enabled=False`` makes every tick return no decision at all: the static configuration stays exactly as it is.
    """

    def __init__(
        self,
        *,
        bounds: Mapping[str, Bounds],
        enabled: bool = True,
        deadband: float = 0.3,
        admission_share: float = 0.7,
        timeout_share: float = 0.05,
        cooldown_s: float = 4.0,
        trial_s: float = 12.0,
        rollback_tolerance: float = 0.05,
        bar_s: float = 120.0,
        attainment_target: float = 0.99,
        memory_reserve_ratio: float = 0.2,
        learned: LearnedTable | None = None,
        learn_confirm_ticks: int = 2,
    ) -> None:
        unknown = set(bounds) - set(KNOBS)
        if unknown:
            raise ValueError(f"unknown tuner knobs {sorted(unknown)}; known: {list(KNOBS)}")
        if not 0 <= deadband < 1:
            raise ValueError(f"deadband must be in [0, 1), got {deadband}")
        if not 0 < admission_share <= 1:
            raise ValueError(f"admission_share must be in (0, 1], got {admission_share}")
        if not 0 < timeout_share <= 1:
            raise ValueError(f"timeout_share must be in (0, 1], got {timeout_share}")
        for name, value in (("cooldown_s", cooldown_s), ("trial_s", trial_s), ("bar_s", bar_s)):
            if value < 0:
                raise ValueError(f"{name} must not be negative, got {value}")
        self.bounds = dict(bounds)
        self.enabled = enabled
        self.deadband = deadband
        self.admission_share = admission_share
        self.timeout_share = timeout_share
        self.cooldown_s = cooldown_s
        self.trial_s = trial_s
        self.rollback_tolerance = rollback_tolerance
        self.bar_s = bar_s
        self.attainment_target = attainment_target
        self.memory_reserve_ratio = memory_reserve_ratio
        self.learned = learned if learned is not None else LearnedTable(attainment_target=attainment_target)
        self.learn_confirm_ticks = learn_confirm_ticks
        self._last_change: dict[str, float] = {}
        self._trial: _Trial | None = None
        self._barred: dict[tuple[str, str, int], float] = {}
        self._level: str | None = None
        self._level_ticks = 0
        self._learned_applied: str | None = None
        self.sources: dict[str, Source] = {}

    # -- the tick -------------------------------------------------------------------------------------------

    def tick(self, readings: Readings, now: float) -> TickResult:
        if not self.enabled:
            return TickResult([], None)
        level = load_level(readings)
        if level == self._level:
            self._level_ticks += 1
        else:
            self._level, self._level_ticks = level, 1
            self._learned_applied = None
        observation = self._observe(readings, level, now)
        settings = dict(readings.settings)  # unmanaged ones too: rules read them, _move turns only managed knobs

        decisions = self._judge_trial(readings, level, settings, now)
        if decisions:
            return self._finish(decisions, readings, now, observation, gain=False)

        protect = self._protect(readings, settings, level, now)
        if protect:
            return self._finish(protect, readings, now, observation, gain=False)
        learned = self._from_learned(readings, settings, level, now)
        if learned:
            return self._finish(learned, readings, now, observation, gain=True)
        gain = self._gain(readings, settings, level, now)
        return self._finish(gain, readings, now, observation, gain=bool(gain))

    def _observe(self, readings: Readings, level: str, now: float) -> Observation | None:
        if readings.completed_per_s <= 0:
            return None
        attainment = readings.goodput_per_s / readings.completed_per_s
        obs = Observation(now, level, {k: readings.settings.get(k) for k in self.bounds if k in readings.settings},
                          readings.goodput_per_s, attainment, readings.offered_per_s)
        # The settings are only credited once they have been in place for a whole trial period: readings taken
        # just after a change still describe the settings before it.
        if all(now - t >= self.trial_s for t in self._last_change.values()):
            self.learned.observe(obs)
            return obs
        return None

    def _finish(self, decisions: list[Decision], readings: Readings, now: float, observation: Observation | None,
                *, gain: bool) -> TickResult:
        if decisions and gain:
            ratio = readings.goodput_per_s / readings.offered_per_s if readings.offered_per_s else 1.0
            attainment = readings.goodput_per_s / readings.completed_per_s if readings.completed_per_s else 1.0
            worst = _worst(readings.models)
            p99_ratio = worst.p99_s / worst.slo_p99_s if worst is not None else math.nan
            self._trial = _Trial(now + self.trial_s, decisions[0].load_level, decisions, ratio, attainment, p99_ratio)
        for d in decisions:
            self._last_change[d.knob] = now
            self.sources[d.knob] = d.source
        return TickResult(decisions, observation)

    # -- guardrails -----------------------------------------------------------------------------------------

    def _move(self, knob: str, settings: Mapping[str, Value], wanted: float, reason: str, source: Source,
              level: str, readings: Readings, now: float, *, respect_cooldown: bool = True) -> Decision | None:
        bounds = self.bounds.get(knob)
        if bounds is None or knob not in settings:
            return None
        old = settings[knob]
        if respect_cooldown and now - self._last_change.get(knob, -math.inf) < self.cooldown_s:
            return None
        integer = knob in INTEGER_KNOBS
        new = bounds.clamp(None if old is None else float(old), wanted, integer=integer)
        if old is not None and math.isclose(new, float(old), rel_tol=1e-9, abs_tol=1e-12):
            return None
        direction = 0 if old is None else (1 if new > float(old) else -1)
        if self._barred.get((knob, level, direction), -math.inf) > now and source != ROLLBACK:
            return None
        value: Value = int(new) if integer else new
        return Decision(now, knob, old, value, reason, source, level, readings.summary())

    def _judge_trial(self, readings: Readings, level: str, settings: Mapping[str, Value], now: float) -> list[Decision]:
        trial = self._trial
        if trial is None or now < trial.until:
            return []
        self._trial = None
        if readings.offered_per_s <= 0:
            return []
        ratio = readings.goodput_per_s / readings.offered_per_s
        attainment = readings.goodput_per_s / readings.completed_per_s if readings.completed_per_s else 1.0
        if trial.remedy:
            # A smaller batch that did not bring p99 down (or attainment up) only cost throughput: undo it, or a
            # breach with another cause (a starved CPU) would walk the batch down to one.
            worst = _worst(readings.models)
            p99_ratio = worst.p99_s / worst.slo_p99_s if worst is not None else math.nan
            cured = (not math.isnan(p99_ratio) and p99_ratio < 0.9 * trial.p99_ratio) or (
                attainment > trial.attainment + self.rollback_tolerance)
            regressed = not cured
        elif level != trial.level:
            return []  # the load moved: the comparison would say nothing about the change
        else:
            regressed = ratio < trial.goodput_ratio - self.rollback_tolerance or (
                trial.attainment >= self.attainment_target and attainment < self.attainment_target
            )
        if not regressed:
            return []
        out = []
        for d in trial.decisions:
            if d.old is None or settings.get(d.knob) is None:
                continue
            direction = 1 if float(d.new) > float(d.old) else -1  # type: ignore[arg-type]
            self._barred[(d.knob, level, direction)] = now + self.bar_s
            bounds = self.bounds[d.knob]
            current = float(settings[d.knob])  # type: ignore[arg-type]
            new = bounds.clamp(current, float(d.old), integer=d.knob in INTEGER_KNOBS)
            if math.isclose(new, current):
                continue
            value: Value = int(new) if d.knob in INTEGER_KNOBS else new
            out.append(Decision(now, d.knob, settings[d.knob], value, ROLLBACK, ROLLBACK, level, readings.summary()))
        return out

    # -- the fast loop: protect first ------------------------------------------------------------------------

    def _capacity_target(self, readings: Readings, settings: Mapping[str, Value]) -> float | None:
        """Little's law: the requests that may be inside the server so that the last admitted meets its SLO."""
        served = [m for m in readings.models if m.requests_per_s > 0]
        if not served:
            return None
        target = sum(m.requests_per_s * m.slo_p99_s * self.admission_share for m in served)
        batch = settings.get(MAX_BATCH)
        # Never below one batch: a queue too short to fill batches lowers throughput, which would lower the
        # target again (a spiral down to one request at a time).
        floor = float(batch) if batch is not None else 1.0
        return max(target, floor)

    def _protect(self, readings: Readings, settings: Mapping[str, Value], level: str, now: float) -> list[Decision]:
        """Changes that keep admitted requests inside their objective; made at once, never rolled back."""
        worst = _worst(readings.models)
        out: list[Decision] = []
        breach = worst is not None and (worst.p99_s > worst.slo_p99_s or _ttft_breach(worst))
        capacity = settings.get(QUEUE_CAPACITY)
        target = self._capacity_target(readings, settings)
        batch = settings.get(MAX_BATCH)
        queued = sum(m.waiting for m in readings.models)
        if capacity is not None and target is not None:
            # Time spent waiting for a running slot: what admission adds to a request (Little's law on the queue).
            wait = queued / readings.completed_per_s if readings.completed_per_s else 0.0
            budget = min(m.slo_p99_s for m in readings.models if m.requests_per_s > 0) * self.admission_share
            # Only the queue is cut: a breach with a short queue (a slow engine, a noisy neighbour) is no reason to
            # turn requests away, and completions below capacity would understate what the server can take.
            queue_is_slow = wait > budget or (breach and batch is not None and queued >= float(batch))
            if queue_is_slow and target < 0.9 * float(capacity):
                reason = SLO_BREACH if breach else QUEUE_WAIT
                d = self._move(QUEUE_CAPACITY, settings, target, reason, "tuned", level, readings, now,
                               respect_cooldown=False)
                if d:
                    out.append(d)
        if breach and worst is not None and worst.continuous_batching and RUNNING_LIMIT in self.bounds:
            # An engine that batches by itself slows every running request as its batch grows: with nothing
            # waiting in our queue, fewer at once inside it is the lever.
            running_limit = settings.get(RUNNING_LIMIT)
            if queued == 0 and worst.running > 1:
                current = float(running_limit) if running_limit is not None else float(worst.running)
                d = self._move(RUNNING_LIMIT, {RUNNING_LIMIT: current}, current * 0.75, SLO_BREACH, "tuned",
                               level, readings, now)
                if d:
                    out.append(replace(d, old=running_limit))
        memory = self._memory_pressure(readings)
        kv = settings.get(KV_BUDGET)
        if memory and kv is not None:
            d = self._move(KV_BUDGET, settings, float(kv) / 2, MEMORY_PRESSURE, "tuned", level, readings, now)
            if d:
                out.append(d)
        return out

    def _memory_pressure(self, readings: Readings) -> bool:
        gpu = readings.gpu_memory_used_ratio
        if gpu is not None and gpu > 1 - self.memory_reserve_ratio:
            return True
        if not readings.memory_available_bytes or not readings.memory_total_bytes:
            return False
        return readings.memory_available_bytes < self.memory_reserve_ratio * readings.memory_total_bytes

    # -- the slow loop: what worked here before ---------------------------------------------------------------

    def _from_learned(self, readings: Readings, settings: Mapping[str, Value], level: str, now: float) -> list[Decision]:
        if self._level_ticks < self.learn_confirm_ticks or self._learned_applied == level:
            return []
        best = self.learned.best(level)
        if best is None:
            return []
        target, goodput, attainment = best
        if attainment < self.attainment_target:
            return []
        out = []
        for knob, value in target.items():
            if knob not in settings or value is None or settings[knob] is None or knob == KV_BUDGET:
                continue
            d = self._move(knob, settings, float(value), LEARNED, "learned", level, readings, now)
            if d:
                out.append(d)
        if not out or all(self._at(settings, d) for d in out):
            self._learned_applied = level
        return out

    @staticmethod
    def _at(settings: Mapping[str, Value], d: Decision) -> bool:
        return d.new == settings.get(d.knob)

    # -- the fast loop: gain where there is headroom ------------------------------------------------------------

    def _gain(self, readings: Readings, settings: Mapping[str, Value], level: str, now: float) -> list[Decision]:
        if self._trial is not None:
            return []  # one experiment at a time, or the trial would not know what to blame
        worst = _worst(readings.models)
        headroom = worst is None or (worst.p99_s < (1 - self.deadband) * worst.slo_p99_s and not _ttft_breach(worst))
        out: list[Decision] = []
        queued = sum(m.waiting for m in readings.models)
        batch = settings.get(MAX_BATCH)
        capacity = settings.get(QUEUE_CAPACITY)
        target = self._capacity_target(readings, settings)
        if worst is not None and headroom:
            if capacity is not None and target is not None and readings.rejected_per_s > 0:
                # Turning requests away with latency to spare: admit more. Under real overload the added wait
                # eats the headroom and this stops; the trial rolls it back if goodput fell.
                d = self._move(QUEUE_CAPACITY, settings, max(target, float(capacity) * 1.5), HEADROOM, "tuned",
                               level, readings, now)
                if d:
                    out.append(d)
        breach = worst is not None and (worst.p99_s > worst.slo_p99_s or _ttft_breach(worst))
        running = sum(m.running for m in readings.models)
        shrink = None
        if (breach and batch is not None and queued < float(batch) and running >= float(batch)
                and worst.p50_s > 0.5 * worst.slo_p99_s):
            # Slow with a short queue and full batches: the batch's own run time is the latency (long prompts, a
            # big model). A smaller batch finishes sooner; the trial undoes it unless p99 or attainment improved.
            shrink = self._move(MAX_BATCH, settings, float(batch) / 2, SLO_BREACH, "tuned", level, readings, now)
            if shrink:
                out.append(shrink)
        if shrink is None and worst is not None and (headroom or readings.rejected_per_s > 0):
            # Batches that fill from the queue: a bigger one may raise throughput (and with it what admission
            # lets in). Worth trying when saturated even without headroom; the trial undoes it if goodput fell.
            if batch is not None and queued >= float(batch):
                d = self._move(MAX_BATCH, settings, float(batch) * 2, HEADROOM, "tuned", level, readings, now)
                if d:
                    out.append(d)
            running_limit = settings.get(RUNNING_LIMIT)
            if running_limit is not None and worst.continuous_batching and queued > 0:
                d = self._move(RUNNING_LIMIT, settings, float(running_limit) * 1.5, HEADROOM, "tuned", level,
                               readings, now)
                if d:
                    out.append(d)
        timeout = settings.get(BATCH_TIMEOUT)
        if timeout is not None and batch is not None and worst is not None:
            d = self._batch_window(readings, settings, float(timeout), float(batch), level, now)
            if d:
                out.append(d)
        kv = settings.get(KV_BUDGET)
        if kv is not None and readings.kv_evictions_per_s > 0 and not self._memory_pressure(readings):
            room = readings.memory_available_bytes
            reserve = self.memory_reserve_ratio * (readings.memory_total_bytes or 0)
            if room is None or room - reserve > float(kv) * 0.5:
                d = self._move(KV_BUDGET, settings, float(kv) * 1.5, CACHE_EVICTIONS, "tuned", level, readings, now)
                if d:
                    out.append(d)
        return out

    def _batch_window(self, readings: Readings, settings: Mapping[str, Value], timeout: float, batch: float,
                      level: str, now: float) -> Decision | None:
        """The time in which half a batch is expected to arrive, capped at ``timeout_share`` of the objective."""
        rate = max((m.requests_per_s for m in readings.models if not m.continuous_batching), default=0.0)
        if rate <= 0:
            return None
        slo = min(m.slo_p99_s for m in readings.models if m.requests_per_s > 0)
        bounds = self.bounds.get(BATCH_TIMEOUT)
        if bounds is None:
            return None
        wanted = min(max(batch / 2 - 1, 0.0) / rate, self.timeout_share * slo)
        # Hysteresis: a change smaller than half the current value (or a millisecond) is not worth a PATCH.
        if abs(wanted - timeout) < max(0.5 * timeout, 0.001):
            return None
        return self._move(BATCH_TIMEOUT, settings, wanted, BATCH_WINDOW, "tuned", level, readings, now)


def _ttft_breach(m: ModelReading) -> bool:
    return m.slo_ttft_s is not None and not math.isnan(m.ttft_p99_s) and m.ttft_p99_s > m.slo_ttft_s


__all__ = [
    "BATCH_TIMEOUT",
    "INTEGER_KNOBS",
    "KNOBS",
    "KV_BUDGET",
    "MAX_BATCH",
    "QUEUE_CAPACITY",
    "REASONS",
    "RUNNING_LIMIT",
    "Bounds",
    "Decision",
    "LearnedTable",
    "ModelReading",
    "Observation",
    "Readings",
    "TickResult",
    "TunerPolicy",
    "load_level",
]
