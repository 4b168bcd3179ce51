"""Admission: the server's bounded queue of requests, and what readiness needs to spot a stuck engine.

``AdmissionState`` is the pure core. It counts admitted requests (waiting for a running slot + running) against a
capacity (8.2), refuses past it or while draining (8.3, 8.5), and remembers when output last came out so that
readiness can tell "busy" from "stuck" (an engine with requests in flight that has produced nothing for a while).
It never reads a clock: every call takes ``now``.

Admission can also be bounded by waiting time (``server.max_queue_wait_s``): while the oldest request of a model
still waiting for a running slot has waited longer than the bound, new requests for that model are refused. The
queue is FIFO, so the head's wait is what a request admitted now will wait too; unlike a count, the bound follows
what the engine does right now (long prompts, a slower neighbour) without a rate to estimate, and the tuner sets
it from the latency objective.

``AdmissionQueue`` is the asyncio shell: a FIFO per model of requests waiting for a running slot, so that at most
``running_limit(model)`` requests of a model are inside the engine layer at once (``None`` means no limit: engines
with continuous batching take everything straight away). Waiting time is the queue time the metrics report.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from orchestrator.errors import MuaiError

QUEUE_FULL = "queue_full"
QUEUE_WAIT = "queue_wait"
DRAINING = "draining"


class AdmissionRejected(MuaiError, RuntimeError):
    """The request was not admitted: the queue is full or waits too long (429), or the server is draining (503)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(slots=True, eq=False)
class Ticket:
    """One admitted request, from admission until it finishes (successfully or not)."""

    model: str
    admitted_at: float
    started_at: float | None = None
    finished: bool = False

    @property
    def running(self) -> bool:
        return self.started_at is not None and not self.finished


@dataclass(slots=True)
class _ModelCounts:
    waiting: int = 0
    running: int = 0


@dataclass(frozen=True, slots=True)
class AdmissionSnapshot:
    """Counts for readiness and metrics at one instant."""

    capacity: int
    waiting: int
    running: int
    draining: bool
    stalled_s: float
    """Seconds with requests in flight and no output; 0 when idle or when output is flowing."""
    per_model: dict[str, tuple[int, int]] = field(default_factory=dict)
    """model -> (waiting, running)."""

    @property
    def in_flight(self) -> int:
        return self.waiting + self.running


class AdmissionState:
    """Counts admitted requests against a capacity; refuses when full or draining. Pure: takes ``now``."""

    def __init__(self, *, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self._capacity = capacity
        self._models: dict[str, _ModelCounts] = {}
        self._in_flight = 0
        self._draining = False
        self._busy_since: float | None = None
        self._last_progress = 0.0
        # Per model, tickets in admission order; started and finished ones are dropped lazily from the left, so
        # the head is the oldest still waiting (each ticket is appended and popped once).
        self._waiting: dict[str, deque[Ticket]] = {}

    @property
    def capacity(self) -> int:
        return self._capacity

    @capacity.setter
    def capacity(self, value: int) -> None:
        # Lowering it below the current count admits nothing new until enough finish; nobody is evicted.
        if value < 1:
            raise ValueError(f"capacity must be at least 1, got {value}")
        self._capacity = value

    @property
    def draining(self) -> bool:
        return self._draining

    def drain(self) -> None:
        """Admit nothing more; requests already admitted carry on."""
        self._draining = True

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def counts(self, model: str) -> _ModelCounts:
        counts = self._models.get(model)
        if counts is None:
            counts = self._models[model] = _ModelCounts()
        return counts

    def oldest_wait(self, model: str, now: float) -> float:
        """Seconds the oldest request of ``model`` still waiting for a running slot has waited (0 when none)."""
        line = self._waiting.get(model)
        while line and (line[0].started_at is not None or line[0].finished):
            line.popleft()
        return max(0.0, now - line[0].admitted_at) if line else 0.0

    def admit(self, model: str, now: float, *, max_wait_s: float | None = None) -> Ticket:
        """Admit a request of ``model`` or raise :class:`AdmissionRejected`; ``max_wait_s`` bounds the head's wait."""
        if self._draining:
            raise AdmissionRejected(DRAINING, "the server is shutting down and admits no new requests")
        if self._in_flight >= self._capacity:
            raise AdmissionRejected(
                QUEUE_FULL, f"the request queue is full ({self._capacity} requests admitted); retry later"
            )
        # Read on every admission, bound or not: it also drops the line's started tickets, which keeps it short.
        waited = self.oldest_wait(model, now)
        if max_wait_s is not None and waited > max_wait_s:
            raise AdmissionRejected(
                QUEUE_WAIT, f"requests for {model!r} have waited {waited:.2f} s for a slot, past "
                f"server.max_queue_wait_s ({max_wait_s:g} s); retry later"
            )
        if self._in_flight == 0:
            self._busy_since = now
        self._in_flight += 1
        self.counts(model).waiting += 1
        ticket = Ticket(model, now)
        line = self._waiting.get(model)
        if line is None:
            line = self._waiting[model] = deque()
        line.append(ticket)
        return ticket

    def can_start(self, model: str, limit: int | None) -> bool:
        return limit is None or self.counts(model).running < limit

    def start(self, ticket: Ticket, now: float) -> float:
        """Move a waiting ticket to running; returns its queue time (seconds, never negative)."""
        if ticket.started_at is not None or ticket.finished:
            raise ValueError("ticket already started or finished")
        counts = self.counts(ticket.model)
        counts.waiting -= 1
        counts.running += 1
        ticket.started_at = now
        return max(0.0, now - ticket.admitted_at)

    def finish(self, ticket: Ticket, now: float) -> None:
        """Release a ticket, running or still waiting; a second call is a no-op."""
        if ticket.finished:
            return
        ticket.finished = True
        counts = self.counts(ticket.model)
        if ticket.started_at is None:
            counts.waiting -= 1
        else:
            counts.running -= 1
        self._in_flight -= 1
        if self._in_flight == 0:
            self._busy_since = None

    def progress(self, now: float) -> None:
        """Output came out (a token, a result, an error): the engine is alive."""
        self._last_progress = now

    def stalled_for(self, now: float) -> float:
        """Seconds since output last came out while requests were in flight; 0 when idle.

        Counted from the later of the last output and the moment the server became busy, so that a request
        arriving after a long idle period is not taken for a stuck engine.
        """
        if self._busy_since is None:
            return 0.0
        return max(0.0, now - max(self._busy_since, self._last_progress))

    def snapshot(self, now: float) -> AdmissionSnapshot:
        waiting = sum(c.waiting for c in self._models.values())
        running = sum(c.running for c in self._models.values())
        return AdmissionSnapshot(
            capacity=self._capacity,
            waiting=waiting,
            running=running,
            draining=self._draining,
            stalled_s=self.stalled_for(now),
            per_model={m: (c.waiting, c.running) for m, c in self._models.items()},
        )


class AdmissionQueue:
    """The asyncio shell over :class:`AdmissionState`: FIFO per model for running slots, and drain support.

    ``running_limit(model)`` is asked each time a slot is considered, so runtime config changes apply at once;
    ``None`` means no limit.
    """

    def __init__(
        self,
        *,
        capacity: int,
        running_limit: Callable[[str], int | None] = lambda model: None,
        max_wait_s: Callable[[], float | None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.state = AdmissionState(capacity=capacity)
        self._limit = running_limit
        self._max_wait_s = max_wait_s
        self._clock = clock
        self._waiters: dict[str, deque[tuple[Ticket, asyncio.Future[None]]]] = {}
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def clock(self) -> Callable[[], float]:
        return self._clock

    def admit(self, model: str) -> Ticket:
        """Admit now or raise :class:`AdmissionRejected`; never waits."""
        ticket = self.state.admit(model, self._clock(), max_wait_s=self._max_wait_s())
        self._idle.clear()
        return ticket

    async def start(self, ticket: Ticket) -> float:
        """Wait (FIFO within the model) for a running slot; returns the queue time in seconds."""
        state = self.state
        queue = self._waiters.get(ticket.model)
        if not queue and state.can_start(ticket.model, self._limit(ticket.model)):
            return state.start(ticket, self._clock())
        if queue is None:
            queue = self._waiters[ticket.model] = deque()
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (ticket, future)
        queue.append(entry)
        try:
            await future
        except BaseException:
            # Cancelled (timeout, client gone) while waiting: leave the line; if the slot was already handed
            # over, pass it on so it is not lost.
            if future.done() and not future.cancelled() and ticket.started_at is not None:
                self.finish(ticket)
            else:
                try:
                    queue.remove(entry)
                except ValueError:
                    pass
            raise
        assert ticket.started_at is not None
        return max(0.0, ticket.started_at - ticket.admitted_at)

    def _wake(self, model: str) -> None:
        queue = self._waiters.get(model)
        state = self.state
        while queue and state.can_start(model, self._limit(model)):
            ticket, future = queue.popleft()
            if future.done():
                continue
            state.start(ticket, self._clock())
            future.set_result(None)
        if queue is not None and not queue:
            del self._waiters[model]

    def kick(self) -> None:
        """Re-check every line after a limit changed."""
        for model in list(self._waiters):
            self._wake(model)

    def finish(self, ticket: Ticket) -> None:
        """Release the ticket (idempotent) and hand its slot to the next in line."""
        if ticket.finished:
            return
        was_running = ticket.started_at is not None
        self.state.finish(ticket, self._clock())
        if was_running:
            self._wake(ticket.model)
        if self.state.in_flight == 0:
            self._idle.set()

    def progress(self) -> None:
        self.state.progress(self._clock())

    def drain(self) -> None:
        self.state.drain()

    async def wait_idle(self, timeout: float | None) -> bool:
        """Wait until no admitted request is left; False when ``timeout`` passed first."""
        if self.state.in_flight == 0:
            return True
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            return self.state.in_flight == 0
        return True

    def snapshot(self):
        return self.state.snapshot(self._clock())


__all__ = [
    "DRAINING",
    "QUEUE_FULL",
    "AdmissionQueue",
    "AdmissionRejected",
    "AdmissionSnapshot",
    "AdmissionState",
    "Ticket",
]
