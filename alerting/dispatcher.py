"""The dispatcher: routes alert transitions to sinks without ever blocking the caller.

Each route is a sink plus a policy (:mod:`alerting.ratelimit`). ``submit`` is synchronous and
cheap: it offers the alert to every route's policy and moves whatever is due into that route's
bounded buffer. A scheduler task flushes policies when their timers come due, and one worker task
per route delivers from its buffer with retries, so a slow or failing receiver only ever delays
itself. When a buffer is full the oldest notification is dropped and counted: a newer
notification for a group carries that group's current state, so the newest is worth keeping.
A notification given up after every retry goes back to its route's policy (``undelivered``, where
the policy has it), so a receiver that was down longer than the retries still hears the state.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import math
import random
import time
from collections.abc import Callable, Iterable
from typing import Any

from alerting.alert import Alert, Notification
from alerting.errors import AlertingConfigError, AlertingError, DeliveryError
from alerting.ratelimit import Policy, Throttle
from alerting.sinks.base import Sink

__all__ = ["Route", "Dispatcher", "SinkStats"]

logger = logging.getLogger("muai.alerting")

_MAX_SCHEDULER_SLEEP_S = 60.0
_MIN_SCHEDULER_SLEEP_S = 0.01  # a policy whose next_due does not advance must not spin the loop


@dataclasses.dataclass
class SinkStats:
    """Counters for one route, in notifications; plain values for the caller to export.

    ``sent``: delivered. ``failed``: given up after retries or refused by the receiver.
    ``dropped``: pushed out of a full buffer, submitted after close, or still queued at close.
    ``retries``: extra attempts. ``suppressed``: held back by the route policy, by reason.
    ``queued``: waiting in the buffer now. ``last_error``: the latest failure, for health pages.
    """

    sent: int = 0
    failed: int = 0
    dropped: int = 0
    retries: int = 0
    suppressed: dict[str, int] = dataclasses.field(default_factory=dict)
    queued: int = 0
    last_error: str | None = None

    @property
    def suppressed_total(self) -> int:
        """All suppressions, whatever the reason."""
        return sum(self.suppressed.values())


class Route:
    """A sink, the policy in front of it, and the name its counters go under.

    ``policy=None`` takes the sink's ``default_policy()`` (a :class:`Throttle` for log and webhook,
    a :class:`Passthrough` for Alertmanager), or a :class:`Throttle` if it has none. A sink with a
    ``firing_ttl_s`` (Alertmanager) needs a policy that re-sends firing alerts more often than that.
    """

    def __init__(self, sink: Sink, *, policy: Policy | None = None, name: str | None = None) -> None:
        if not callable(getattr(sink, "send", None)):
            raise AlertingConfigError(f"sink {sink!r} has no send() method")
        self.sink = sink
        self.name = name or getattr(sink, "name", None) or ""
        if not isinstance(self.name, str) or not self.name:
            raise AlertingConfigError(f"route for {sink!r} needs a non-empty name")
        if policy is None:
            factory = getattr(sink, "default_policy", None)
            policy = factory() if callable(factory) else Throttle()
        if not isinstance(policy, Policy):
            raise AlertingConfigError(f"route {self.name!r}: {policy!r} is not a Policy")
        self.policy = policy
        ttl = getattr(sink, "firing_ttl_s", None)
        if ttl is not None:
            resend = getattr(policy, "resend_interval_s", None)
            if resend is None or resend >= ttl:
                raise AlertingConfigError(
                    f"route {self.name!r}: firing alerts expire after firing_ttl_s={ttl}, so the "
                    f"policy must re-send them sooner (a Passthrough with resend_interval_s < {ttl}),"
                    f" got {policy!r} with resend_interval_s={resend}"
                )
        max_batch = getattr(sink, "max_batch", 64)
        if not isinstance(max_batch, int) or max_batch < 1:
            raise AlertingConfigError(f"route {self.name!r}: sink max_batch must be an int >= 1")
        self.max_batch = max_batch

    def __repr__(self) -> str:
        return f"Route(name={self.name!r}, sink={type(self.sink).__name__}, policy={type(self.policy).__name__})"


class _Lane:
    def __init__(self, route: Route) -> None:
        self.route = route
        self.buffer: collections.deque[Notification] = collections.deque()
        self.event = asyncio.Event()
        self.stats = SinkStats()
        self.task: asyncio.Task[None] | None = None
        self.healthy = True


class Dispatcher:
    """Bounded, per-route delivery of alert notifications with retries.

    ``submit(alert)`` never blocks and never raises at runtime; call it from the event loop's
    thread. ``start()`` launches the tasks; ``aclose()`` stops taking alerts, lets the workers drain
    for up to ``drain_timeout_s``, counts what is left as dropped, and closes the sinks (the
    dispatcher owns them). Retries use exponential back-off with full jitter: attempt ``n`` waits
    ``uniform(0, min(backoff_max_s, backoff_base_s * 2**(n-1)))``, or longer when the receiver
    sent ``Retry-After``. ``clock`` drives the policies; it should be monotonic.
    """

    def __init__(
        self,
        routes: Iterable[Route | Sink],
        *,
        buffer_size: int = 1000,
        max_attempts: int = 5,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 30.0,
        drain_timeout_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        lanes: dict[str, _Lane] = {}
        for item in routes:
            route = item if isinstance(item, Route) else Route(item)
            if route.name in lanes:
                raise AlertingConfigError(f"two routes are named {route.name!r}")
            lanes[route.name] = _Lane(route)
        if not lanes:
            raise AlertingConfigError("a dispatcher needs at least one route")
        for name, value, low in (
            ("buffer_size", buffer_size, 1),
            ("max_attempts", max_attempts, 1),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise AlertingConfigError(f"{name} must be an int >= {low}, got {value!r}")
        for name, fvalue in (
            ("backoff_base_s", backoff_base_s),
            ("backoff_max_s", backoff_max_s),
            ("drain_timeout_s", drain_timeout_s),
        ):
            if not isinstance(fvalue, (int, float)) or not math.isfinite(fvalue) or fvalue < 0:
                raise AlertingConfigError(f"{name} must be a finite number >= 0, got {fvalue!r}")
        if backoff_max_s < backoff_base_s:
            raise AlertingConfigError(
                f"backoff_max_s ({backoff_max_s}) must be >= backoff_base_s ({backoff_base_s})"
            )
        self._lanes = lanes
        self.buffer_size = buffer_size
        self.max_attempts = max_attempts
        self.backoff_base_s = float(backoff_base_s)
        self.backoff_max_s = float(backoff_max_s)
        self.drain_timeout_s = float(drain_timeout_s)
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self._wake = asyncio.Event()
        self._scheduler: asyncio.Task[None] | None = None
        self._closing = False
        self._closed = False

    @property
    def routes(self) -> list[Route]:
        """The routes, in the order given."""
        return [lane.route for lane in self._lanes.values()]

    # -- the caller's side -------------------------------------------------------------------

    def submit(self, alert: Alert) -> None:
        """Offer a firing or resolved snapshot to every route. Returns at once; never raises."""
        if self._closing:
            for lane in self._lanes.values():
                lane.stats.dropped += 1
            return
        now = self._clock()
        for lane in self._lanes.values():
            try:
                lane.route.policy.offer(alert, now)
            except Exception:  # a policy bug must not reach the caller's loop
                logger.exception("alert route %r: policy rejected alert %s", lane.route.name, alert.fingerprint)
                continue
            self._pump(lane, now)
        self._wake.set()

    def pump(self, now: float | None = None) -> None:
        """Flush every policy that is due at ``now`` into its buffer (the scheduler calls this)."""
        now = self._clock() if now is None else now
        for lane in self._lanes.values():
            self._pump(lane, now)

    def stats(self) -> dict[str, SinkStats]:
        """A snapshot of every route's counters, by route name."""
        out: dict[str, SinkStats] = {}
        for name, lane in self._lanes.items():
            snap = dataclasses.replace(lane.stats)
            snap.suppressed = dict(lane.route.policy.suppressed)
            snap.queued = len(lane.buffer)
            out[name] = snap
        return out

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the scheduler and one worker per route. Idempotent."""
        if self._closing:
            raise AlertingError("dispatcher is closed and cannot be started again")
        if self._scheduler is not None:
            return
        for name, lane in self._lanes.items():
            lane.task = asyncio.create_task(self._work(lane), name=f"alert-sink-{name}")
        self._scheduler = asyncio.create_task(self._schedule(), name="alert-scheduler")

    async def aclose(self, timeout: float | None = None) -> None:
        """Stop, drain within ``timeout`` (default ``drain_timeout_s``), close the sinks."""
        if self._closed:
            return
        self._closed = True
        self._pump_all_due()
        self._closing = True
        timeout = self.drain_timeout_s if timeout is None else timeout
        if self._scheduler is not None:
            self._scheduler.cancel()
            await asyncio.gather(self._scheduler, return_exceptions=True)
        tasks = [lane.task for lane in self._lanes.values() if lane.task is not None]
        for lane in self._lanes.values():
            lane.event.set()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for lane in self._lanes.values():
            lane.stats.dropped += len(lane.buffer)
            lane.buffer.clear()
            closer = getattr(lane.route.sink, "aclose", None)
            if callable(closer):
                try:
                    await closer()
                except Exception:
                    logger.exception("alert sink %r failed to close", lane.route.name)

    async def __aenter__(self) -> Dispatcher:
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    # -- internals ----------------------------------------------------------------------------

    def _pump_all_due(self) -> None:
        now = self._clock()
        for lane in self._lanes.values():
            self._pump(lane, now)

    def _pump(self, lane: _Lane, now: float) -> None:
        policy = lane.route.policy
        try:
            due = policy.next_due()
            notes = policy.flush(now) if due is not None and due <= now else []
        except Exception:
            logger.exception("alert route %r: policy flush failed", lane.route.name)
            return
        for note in notes:
            if len(lane.buffer) >= self.buffer_size:
                lane.buffer.popleft()
                lane.stats.dropped += 1
            lane.buffer.append(note)
        if notes:
            lane.event.set()

    async def _schedule(self) -> None:
        while True:
            now = self._clock()
            next_due: float | None = None
            for lane in self._lanes.values():
                self._pump(lane, now)
                try:
                    due = lane.route.policy.next_due()
                except Exception:
                    due = None
                if due is not None and (next_due is None or due < next_due):
                    next_due = due
            timeout = _MAX_SCHEDULER_SLEEP_S
            if next_due is not None:
                timeout = min(timeout, max(_MIN_SCHEDULER_SLEEP_S, next_due - self._clock()))
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except asyncio.TimeoutError:
                pass

    async def _work(self, lane: _Lane) -> None:
        while True:
            if not lane.buffer:
                if self._closing:
                    return
                lane.event.clear()
                await lane.event.wait()
                continue
            n = min(lane.route.max_batch, len(lane.buffer))
            batch = [lane.buffer.popleft() for _ in range(n)]
            try:
                await self._deliver(lane, batch)
            except asyncio.CancelledError:
                lane.stats.dropped += len(batch)
                raise

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        cap = min(self.backoff_max_s, self.backoff_base_s * 2 ** (attempt - 1))
        delay = self._rng.uniform(0.0, cap)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.backoff_max_s))
        return delay

    def _give_back(self, lane: _Lane, batch: list[Notification]) -> None:
        """Hand notifications the receiver never got back to the policy, which then sends that state again
        (a Throttle would otherwise wait a whole repeat interval, believing the receiver had it). A receiver
        that refused them (not retryable) would refuse them again, so those are not given back."""
        undelivered = getattr(lane.route.policy, "undelivered", None)
        if not callable(undelivered):
            return
        now = self._clock()
        for note in batch:
            try:
                undelivered(note, now)
            except Exception:  # a policy bug must not stop the worker
                logger.exception("alert route %r: policy could not take back a notification", lane.route.name)
        self._wake.set()

    async def _deliver(self, lane: _Lane, batch: list[Notification]) -> None:
        name = lane.route.name
        error: BaseException | None = None
        for attempt in range(1, self.max_attempts + 1):
            retry_after: float | None = None
            try:
                await lane.route.sink.send(batch)
            except DeliveryError as exc:
                error, retryable, retry_after = exc, exc.retryable, exc.retry_after
            except (OSError, asyncio.TimeoutError) as exc:
                error, retryable = exc, True
            except Exception as exc:  # a sink bug: no point in trying again
                error, retryable = exc, False
            else:
                lane.stats.sent += len(batch)
                if not lane.healthy:
                    lane.healthy = True
                    logger.info("alert sink %r delivers again", name)
                return
            if not retryable or attempt == self.max_attempts:
                break
            lane.stats.retries += 1
            await asyncio.sleep(self._backoff(attempt, retry_after))
        lane.stats.failed += len(batch)
        lane.stats.last_error = repr(error)[:500]
        if retryable:
            self._give_back(lane, batch)
        # Log once per outage, not once per notification.
        if lane.healthy:
            lane.healthy = False
            logger.warning(
                "alert sink %r failed to deliver %d notification(s) after %d attempt(s): %r",
                name, len(batch), attempt, error,
            )
        else:
            logger.debug("alert sink %r still failing: %r", name, error)

