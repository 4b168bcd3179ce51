"""The tuner's policy: readings and ``now`` in, decisions out. No I/O, no clock, no threads.

Two loops share one object:

* **Fast** (every tick, seconds): SLO headroom moves the knobs. Admission follows Little's law: with ``X``
  requests per second completing and an objective of ``W`` seconds, at most ``X * W * admission_share`` requests
  may be inside the server at once, or the last admitted one cannot finish in time; so when the queue is what is
  slow (or, growing as it did over the last tick, will be by the next), the queue capacity is cut to that figure
  at once, and while requests are turned away with latency to spare and room inside it grows again. ``X`` is
  what the server does now: the latency windows lag (a request counts once its span arrives, seconds late), so a
  saturated server's own count of finished requests over the last tick (``Readings.served_per_s``) stands for
  it. Where the tuner manages ``server.max_queue_wait_s``, admission is by waiting time instead: the bound starts
  at what is left of that share once the engine layer has its own (the requests running in it over ``X``), comes
  down while the requests finishing now (the orchestrator's latency histogram since the last tick) are late after
  waiting near it, and goes up while it turns requests away with latency to spare. The batch size grows while batches
  fill from the queue (with headroom, or when saturated) and the doubled batch still fits Little's law (in an overload
  whose requests are late in the queue rather than in the engine, even with the fresh tail past the deadband), and
  halves when, with batches full, one batch is more than Little's law admits (the batch's own run time is the
  latency: long prompts, a big model), on a breach or a throughput that just fell; both are trials: a bigger batch
  is rolled back if goodput fell, a smaller one unless p99 fell or attainment rose, because a smaller batch also
  lowers throughput and with it what admission lets in. The batch timeout is the time in which half a batch is expected to arrive, never more than a small share of the
  objective; it follows the rate like admission and is no trial. The KV-cache budget grows while
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
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, replace

from sidecar.tuner.learned import LearnedTable, load_level
from sidecar.tuner.readings import (
    BATCH_TIMEOUT,
    BATCH_WINDOW,
    CACHE_EVICTIONS,
    HEADROOM,
    INTEGER_KNOBS,
    KNOBS,
    KV_BUDGET,
    LEARNED,
    MAX_BATCH,
    MAX_QUEUE_WAIT,
    MEMORY_PRESSURE,
    NULLABLE_KNOBS,
    QUEUE_CAPACITY,
    QUEUE_WAIT,
    REASONS,
    ROLLBACK,
    RUNNING_LIMIT,
    SLO_BREACH,
    Bounds,
    Decision,
    ModelReading,
    Observation,
    Readings,
    Source,
    Value,
    fresh_worst,
    ttft_breach,
    worst_model,
    worst_slo,
)


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
        self._queue_seen: deque[tuple[float, int]] = deque(maxlen=2)
        """(now, requests waiting) of this tick and the one before: how fast the queue grows."""
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
        self._queue_seen.append((now, sum(m.waiting for m in readings.models)))
        settings = dict(readings.settings)  # unmanaged ones too: rules read them, _move turns only managed knobs

        decisions = self._judge_trial(readings, level, settings, now)
        if decisions:
            return self._finish(decisions, readings, now, observation, gain=False)

        protect = self._protect(readings, settings, level, now)
        if protect:
            # Bounding the wait turns requests away; in an overload that is late in the queue, a bigger batch drains it
            # faster as well, and waiting a cooldown for it lets the first seconds of the burst queue past the
            # objective (in one run the batch doubled 6 s after the bound was set, where a run that had it at once
            # met the objective through the whole burst). Only the batch is a trial: the bound follows the latency.
            drain = self._drain(readings, settings, level, now) if all(
                d.knob == MAX_QUEUE_WAIT for d in protect) else None
            if drain is not None:
                return self._finish([*protect, drain], readings, now, observation, gain=True)
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
        # The batch timeout follows the arrival rate the way admission follows Little's law, and the wait bound
        # follows the fresh latency: derived values, not experiments, so they neither open a trial nor wait for one
        # (a trial blocks every other gain).
        trial = [d for d in decisions if d.reason != BATCH_WINDOW and d.knob != MAX_QUEUE_WAIT]
        if trial and gain:
            ratio = readings.goodput_per_s / readings.offered_per_s if readings.offered_per_s else 1.0
            attainment = readings.goodput_per_s / readings.completed_per_s if readings.completed_per_s else 1.0
            worst = worst_model(readings.models)
            p99_ratio = worst.p99_s / worst.slo_p99_s if worst is not None else math.nan
            self._trial = _Trial(now + self.trial_s, trial[0].load_level, trial, ratio, attainment, p99_ratio)
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
            worst = worst_model(readings.models)
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

    def _capacity_target(self, readings: Readings, settings: Mapping[str, Value], *,
                         one_batch_at_least: bool = True) -> float | None:
        """Little's law: the requests that may be inside the server so that the last admitted meets its SLO."""
        served = [m for m in readings.models if m.requests_per_s > 0]
        if not served:
            return None
        target = sum(m.requests_per_s * m.slo_p99_s * self.admission_share for m in served)
        throughput = self._throughput(readings)
        if throughput > 0 and readings.completed_per_s > 0:
            target *= throughput / readings.completed_per_s
        if not one_batch_at_least:
            return target
        batch = settings.get(MAX_BATCH)
        # Never below one batch: a queue too short to fill batches lowers throughput, which would lower the
        # target again (a spiral down to one request at a time).
        floor = float(batch) if batch is not None else 1.0
        return max(target, floor)

    @staticmethod
    def _throughput(readings: Readings) -> float:
        """What the server completes per second now.

        The window averages over seconds before a change and sees a request only once its span arrives. Saturated
        (requests waiting for a slot, or a full batch ready whenever the engine frees), the orchestrator's own count
        of the last tick is what the server can do now (higher after a burst began, lower once prompts grew
        longer); otherwise the higher of the two.
        """
        fresh = readings.served_per_s
        if math.isnan(fresh):
            return readings.completed_per_s
        batch = readings.settings.get(MAX_BATCH)
        saturated = any(m.waiting > 0 for m in readings.models) or (
            batch is not None and sum(m.running for m in readings.models) > float(batch))
        if saturated and fresh > 0:
            return fresh
        return max(readings.completed_per_s, fresh)

    def _queue_growth(self, queued: int, now: float) -> float:
        """Requests the queue will have gained by the next tick, at the rate it grew since the last one."""
        if len(self._queue_seen) < 2:
            return 0.0
        (before, was), (last, _) = self._queue_seen[-2], self._queue_seen[-1]
        if last != now or last <= before:
            return 0.0
        return max(0.0, float(queued - was))

    def _protect(self, readings: Readings, settings: Mapping[str, Value], level: str, now: float) -> list[Decision]:
        """Changes that keep admitted requests inside their objective; made at once, never rolled back."""
        worst = worst_model(readings.models)
        out: list[Decision] = []
        breach = worst is not None and (worst.p99_s > worst.slo_p99_s or ttft_breach(worst))
        capacity = settings.get(QUEUE_CAPACITY)
        target = self._capacity_target(readings, settings)
        batch = settings.get(MAX_BATCH)
        queued = sum(m.waiting for m in readings.models)
        if capacity is not None and target is not None:
            # Time spent waiting for a running slot: what admission adds to a request (Little's law on the queue).
            throughput = self._throughput(readings)
            wait = queued / throughput if throughput else 0.0
            # Where the queue is heading: a burst that goes on adds as much again by the next tick. Cutting now
            # keeps out the requests that would otherwise sit in a full queue past their objective; the latency
            # windows would show the breach only once those requests finished (and their spans arrived).
            ahead = (queued + self._queue_growth(queued, now)) / throughput if throughput else 0.0
            budget = min(m.slo_p99_s for m in readings.models if m.requests_per_s > 0) * self.admission_share
            # Only the queue is cut: a breach with a short queue (a slow engine, a noisy neighbour) is no reason to
            # turn requests away, and completions below capacity would understate what the server can take.
            queue_is_slow = wait > budget or ahead > budget or (breach and batch is not None and queued >= float(batch))
            if self._wait_bound_managed(settings):
                # A bound on waiting time admits by what the queue does now: it replaces the cut by a count.
                d = self._wait_protect(readings, settings, level, now, slow=queue_is_slow, breach=breach)
                if d:
                    out.append(d)
            elif queue_is_slow and target < 0.9 * float(capacity):
                reason = SLO_BREACH if breach else QUEUE_WAIT
                d = self._move(QUEUE_CAPACITY, settings, target, reason, "tuned", level, readings, now,
                               respect_cooldown=False)
                if d:
                    out.append(d)
        elif self._wait_bound_managed(settings):
            d = self._wait_protect(readings, settings, level, now, slow=False, breach=breach)
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

    # -- admission by waiting time --------------------------------------------------------------------------

    def _wait_bound_managed(self, settings: Mapping[str, Value]) -> bool:
        return MAX_QUEUE_WAIT in self.bounds and MAX_QUEUE_WAIT in settings

    def _late(self, m: ModelReading) -> bool:
        return m.fresh_p99_s > m.slo_p99_s or m.fresh_attainment < self.attainment_target

    def _wait_protect(self, readings: Readings, settings: Mapping[str, Value], level: str, now: float, *,
                      slow: bool, breach: bool) -> Decision | None:
        """Bound the queue's wait once the queue gets slow, at what :meth:`_wait_ceiling` leaves of ``admission_share``
        of the objective; tighten it while the requests finishing now are late and requests wait (or are turned
        away): what they wait is the lever.

        A late request with no queue at all, or with a queue that waited well short of the bound, is the engine's own
        time (a batch too big, long prompts, a starved CPU): the batch rules answer that, not admission.
        """
        slo = worst_slo(readings)
        if math.isinf(slo):
            return None
        bound = settings.get(MAX_QUEUE_WAIT)
        ceiling = self._wait_ceiling(readings, slo)
        if bound is None:
            if not (slow or breach):
                return None
            return self._move(MAX_QUEUE_WAIT, settings, ceiling, SLO_BREACH if breach else QUEUE_WAIT,
                              "tuned", level, readings, now, respect_cooldown=False)
        queued = sum(m.waiting for m in readings.models)
        worst = fresh_worst(readings.models)
        if worst is None or not self._late(worst) or (queued == 0 and readings.rejected_per_s <= 0):
            return None
        if not math.isnan(worst.fresh_queue_p99_s) and worst.fresh_queue_p99_s < 0.5 * float(bound):
            # Late, but nobody waited near the bound: the time is spent past the queue (the engine, a starved CPU),
            # and a tighter bound would only turn requests away.
            return None
        # Proportional: what the tail overshoots the objective by comes off the bound (a tenth of it at least, half
        # at most), and at least down to what the engine's share leaves, which grows with the batch and the prompts.
        # A fixed fifth per tick walked the bound from 0.6 to 0.14 of the objective through a 30-s overload whose
        # tail stood a few percent over it, and turned away 2.4 times what a static 0.4 did.
        overshoot = worst.fresh_p99_s - worst.slo_p99_s if worst.fresh_p99_s > 0 else 0.0
        wanted = min(float(bound) * 0.9, float(bound) - overshoot, max(ceiling, float(bound) * 0.5))
        return self._move(MAX_QUEUE_WAIT, settings, wanted, SLO_BREACH, "tuned", level, readings, now)

    def _wait_ceiling(self, readings: Readings, slo: float) -> float:
        """What of ``admission_share`` of the objective is left for the queue once the engine layer has its share:
        by Little's law, the requests inside it (running) over what the server completes per second. Never below a
        tenth of the objective: past that the engine's own time is the problem, which the batch rules answer."""
        throughput = self._throughput(readings)
        running = sum(m.running for m in readings.models)
        engine_s = running / throughput if throughput > 0 else 0.0
        return max(0.1 * slo, self.admission_share * slo - engine_s)

    def _wait_relax(self, readings: Readings, settings: Mapping[str, Value], level: str, now: float) -> Decision | None:
        """Loosen a bound that turns requests away while those finishing now have latency to spare, up to
        ``admission_share`` of the objective: a bound that turns requests away which would have met it costs goodput
        and buys nothing (the engine's share only sets where the bound starts and how far a breach cuts it)."""
        bound = settings.get(MAX_QUEUE_WAIT)
        if not self._wait_bound_managed(settings) or bound is None or readings.rejected_per_s <= 0:
            return None
        slo = worst_slo(readings)
        worst = fresh_worst(readings.models)
        if math.isinf(slo) or worst is None or float(bound) >= self.admission_share * slo:
            return None
        if worst.fresh_p99_s >= (1 - self.deadband) * worst.slo_p99_s or worst.fresh_attainment < self.attainment_target:
            return None
        return self._move(MAX_QUEUE_WAIT, settings, min(self.admission_share * slo, float(bound) * 1.25), HEADROOM,
                          "tuned", level, readings, now)

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
        admit = self._capacity_target(readings, settings)
        for knob, value in target.items():
            # A wait bound that worked here is set even while it is off; the other knobs move from a value.
            unset = settings.get(knob) is None and knob != MAX_QUEUE_WAIT
            if knob not in settings or value is None or unset or knob == KV_BUDGET:
                continue
            wanted = float(value)
            if knob == QUEUE_CAPACITY and admit is not None and wanted > max(float(settings[knob]), admit):
                # A long queue that did no harm at this rate (the requests never came) is no reason to open it: past
                # Little's law admission only adds requests that cannot finish in time when a burst comes.
                wanted = max(float(settings[knob]), admit)
            d = self._move(knob, settings, wanted, LEARNED, "learned", level, readings, now)
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
        worst = worst_model(readings.models)
        relax = self._wait_relax(readings, settings, level, now)
        if self._trial is not None:
            # One experiment at a time, or the trial would not know what to blame; the timeout and the wait bound only
            # follow what they follow.
            window = self._window_rule(readings, settings, worst, level, now)
            return [d for d in (window, relax) if d]
        headroom = worst is None or (worst.p99_s < (1 - self.deadband) * worst.slo_p99_s and not ttft_breach(worst))
        # The windows lag by seconds; the requests finished since the last tick do not. A tail already past the
        # deadband there is no time for an experiment (in one run a batch doubled to 64 on the window's headroom
        # while the fresh p99 stood at 0.98 of the objective, and the next tick's was 2.5 times it).
        fresh = fresh_worst(readings.models)
        fresh_late = fresh is not None and fresh.fresh_p99_s >= (1 - self.deadband) * fresh.slo_p99_s
        out: list[Decision] = []
        queued = sum(m.waiting for m in readings.models)
        batch = settings.get(MAX_BATCH)
        capacity = settings.get(QUEUE_CAPACITY)
        target = self._capacity_target(readings, settings)
        throughput = self._throughput(readings)
        # The windows lag (spans arrive seconds late): what is inside the server now must fit Little's law too.
        fits = throughput > 0 and readings.in_flight / throughput <= worst_slo(readings) * self.admission_share
        if worst is not None and headroom and fits and not fresh_late:
            # Under a wait bound the refusals may be its own: only a queue that is nearly full is the capacity's.
            bounded = settings.get(MAX_QUEUE_WAIT) is not None and self._wait_bound_managed(settings)
            full = capacity is not None and readings.in_flight >= 0.9 * float(capacity)
            if capacity is not None and target is not None and readings.rejected_per_s > 0 and (full or not bounded):
                # Turning requests away with latency to spare: admit more. Under real overload the added wait
                # eats the headroom and this stops; the trial rolls it back if goodput fell.
                d = self._move(QUEUE_CAPACITY, settings, max(target, float(capacity) * 1.5), HEADROOM, "tuned",
                               level, readings, now)
                if d:
                    out.append(d)
        running = sum(m.running for m in readings.models)
        shrink = None
        little = self._capacity_target(readings, settings, one_batch_at_least=False)
        # A batch larger than Little's law admits (the requests that can be inside and still finish in time) takes
        # longer than the objective's share by itself: the batch's own run time is the latency (long prompts, a big
        # model). With batches full, the fresh throughput says so before the windows show the breach; and the
        # windows' breach alone is no reason, since it may be that of a queue already cut (their latencies are those
        # of requests admitted up to a window ago). A smaller batch finishes sooner; the trial undoes it unless p99
        # or attainment improved.
        breach = worst is not None and (worst.p99_s > worst.slo_p99_s or ttft_breach(worst))
        falling = self._throughput(readings) < 0.8 * readings.completed_per_s  # the windows have yet to see it
        if (batch is not None and little is not None and running > float(batch) and float(batch) > little
                and (breach or falling)):
            shrink = self._move(MAX_BATCH, settings, float(batch) / 2, SLO_BREACH, "tuned", level, readings, now)
            if shrink:
                out.append(shrink)
        queue_late = batch is not None and self._late_in_queue(readings, float(batch), queued,
                                                               overloaded=readings.rejected_per_s > 0)
        if (shrink is None and worst is not None and (headroom or readings.rejected_per_s > 0)
                and (not fresh_late or queue_late)):
            # Batches that fill from the queue: a bigger one may raise throughput (and with it what admission
            # lets in). Worth trying when saturated even without headroom; the trial undoes it if goodput fell.
            d = self._doubled_batch(readings, settings, little, QUEUE_WAIT if fresh_late else HEADROOM, level, now)
            if d:
                out.append(d)
            running_limit = settings.get(RUNNING_LIMIT)
            if running_limit is not None and worst.continuous_batching and queued > 0:
                d = self._move(RUNNING_LIMIT, settings, float(running_limit) * 1.5, HEADROOM, "tuned", level,
                               readings, now)
                if d:
                    out.append(d)
        window = self._window_rule(readings, settings, worst, level, now)
        if window:
            out.append(window)
        if relax:
            out.append(relax)
        kv = settings.get(KV_BUDGET)
        if kv is not None and readings.kv_evictions_per_s > 0 and not self._memory_pressure(readings):
            room = readings.memory_available_bytes
            reserve = self.memory_reserve_ratio * (readings.memory_total_bytes or 0)
            if room is None or room - reserve > float(kv) * 0.5:
                d = self._move(KV_BUDGET, settings, float(kv) * 1.5, CACHE_EVICTIONS, "tuned", level, readings, now)
                if d:
                    out.append(d)
        return out

    def _drain(self, readings: Readings, settings: Mapping[str, Value], level: str, now: float) -> Decision | None:
        """A doubled batch for an overload the queue makes late (see :meth:`_late_in_queue`), made as a trial."""
        batch = settings.get(MAX_BATCH)
        queued = sum(m.waiting for m in readings.models)
        if self._trial is not None or batch is None or not self._late_in_queue(readings, float(batch), queued,
                                                                               overloaded=True):
            return None
        little = self._capacity_target(readings, settings, one_batch_at_least=False)
        return self._doubled_batch(readings, settings, little, QUEUE_WAIT, level, now)

    def _doubled_batch(self, readings: Readings, settings: Mapping[str, Value], little: float | None, reason: str,
                       level: str, now: float) -> Decision | None:
        """Twice the batch, while batches fill from the queue and the doubled batch still fits Little's law
        (``little``): a batch past it would be halved again by the shrink rule (and under a noisy neighbour the
        smaller batch that stays within it kept more of the objective)."""
        batch = settings.get(MAX_BATCH)
        queued = sum(m.waiting for m in readings.models)
        if batch is None or queued < float(batch) or (little is not None and 2 * float(batch) > little):
            return None
        return self._move(MAX_BATCH, settings, float(batch) * 2, reason, "tuned", level, readings, now)

    def _late_in_queue(self, readings: Readings, batch: float, queued: int, *, overloaded: bool) -> bool:
        """Overloaded, and late because of the wait, not the batch: more offered than served (requests turned away, or
        a queue already slow), a full batch waiting, every running slot taken, the requests finishing now spent at
        least half their time in the queue, and the engine layer's own share of a request (Little's law: running
        over throughput) small enough that doubling it still fits in the deadband. There a bigger batch is what
        shortens the wait without turning more away: it drains the queue faster (in one run at 1.5 times capacity,
        batch 16 held at a tail near the objective let 0.82 of capacity through where a static 32 let more)."""
        if not overloaded or queued < batch:
            return False
        running = sum(m.running for m in readings.models)
        throughput = self._throughput(readings)
        fresh = fresh_worst(readings.models)
        if running < batch or throughput <= 0 or fresh is None or math.isnan(fresh.fresh_queue_p99_s):
            return False
        if fresh.fresh_queue_p99_s < 0.5 * fresh.fresh_p99_s:
            return False
        return 2 * running / throughput <= self.deadband * fresh.slo_p99_s

    def _window_rule(self, readings: Readings, settings: Mapping[str, Value], worst: ModelReading | None, level: str,
                     now: float) -> Decision | None:
        timeout, batch = settings.get(BATCH_TIMEOUT), settings.get(MAX_BATCH)
        if timeout is None or batch is None or worst is None:
            return None
        return self._batch_window(readings, settings, float(timeout), float(batch), level, now)

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


__all__ = [
    "BATCH_TIMEOUT",
    "INTEGER_KNOBS",
    "KNOBS",
    "KV_BUDGET",
    "MAX_BATCH",
    "MAX_QUEUE_WAIT",
    "NULLABLE_KNOBS",
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
