"""The dynamic batching policy: which waiting requests leave together, and when.

A pure, synchronous object: it never reads a clock (every call takes ``now``), never sleeps and does no I/O, so the
property tests can drive it with an advancing number and the asyncio shell (``orchestrator.batcher``) stays thin.

Grouping (6.1). Requests join a group when they share a key: the caller's compatibility key (model, operation,
``SamplingParams.batch_key()``) and, with ``length_bucketing``, the power-of-two bucket of their length, so that
prompts padded together differ in length by at most a factor of two (6.5; the padding itself is the engine's).

Dispatch (6.2, 6.3). A group is *ready* when it holds ``batch_size`` requests (full), or when its oldest request has
waited ``batch_timeout_s`` (due). There is one deadline per group, ``oldest arrival + batch_timeout_s``, computed
when asked, so changing the timeout at runtime applies to requests already waiting.

Adaptive size (6.4), when ``adaptive`` is on; the size always stays within ``[min_batch_size, max_batch_size]``:

- grow: when a batch is taken while more requests wait in its group than fit in it (the queue is deep), the size
  doubles, unless the last batch's execution time (``record_latency``) exceeded ``latency_budget_s``;
- shrink: when a batch leaves on its timeout at most half full (the queue is shallow), the size drops to the
  number it held, so a light load stops waiting for company that does not come.

Without ``adaptive`` the size is ``max_batch_size``.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from orchestrator.errors import BatchingConfigError

DispatchReason = Literal["full", "timeout", "flush"]


class Ticket:
    """One waiting request as the policy sees it; the shell subclasses it to carry its future and context.

    ``key`` is the caller's compatibility key; ``length`` (prompt length, any unit) feeds length bucketing. The policy
    fills ``arrived`` and ``group``.
    """

    __slots__ = ("key", "length", "arrived", "group")

    def __init__(self, key: Hashable, length: int | None = None) -> None:
        self.key = key
        self.length = length
        self.arrived = 0.0
        self.group: Hashable | None = None


@dataclass(slots=True)
class Batch:
    """Requests that leave together, oldest first."""

    key: Hashable
    tickets: list[Any]
    reason: DispatchReason
    opened_at: float
    """Arrival of the oldest request: the batch's waiting time is ``taken_at - opened_at``."""
    taken_at: float
    size: int
    """The size threshold in force when it was taken (``len(batch) <= size <= max_batch_size``)."""

    def __len__(self) -> int:
        return len(self.tickets)


@dataclass(frozen=True, slots=True)
class PolicyStats:
    """Counters since start: requests taken, batches by reason, the current size and depth."""

    batch_size: int
    batch_timeout_s: float
    pending: int
    groups: int
    batches: int
    dispatched: int
    full: int
    timeout: int
    flushed: int
    removed: int


def length_bucket(length: int | None) -> int | None:
    """Power-of-two bucket: lengths 1, 2, 3-4, 5-8, 9-16, ... share one."""
    if length is None:
        return None
    return max(0, int(length) - 1).bit_length()


class _Group:
    __slots__ = ("tickets",)

    def __init__(self) -> None:
        self.tickets: list[Ticket] = []


class BatchingPolicy:
    """Groups compatible requests and decides when each group leaves (see the module docstring for the rules)."""

    def __init__(
        self,
        *,
        max_batch_size: int = 16,
        min_batch_size: int = 1,
        batch_timeout_s: float = 0.005,
        adaptive: bool = True,
        length_bucketing: bool = False,
        latency_budget_s: float | None = None,
        initial_batch_size: int | None = None,
    ) -> None:
        self._groups: dict[Hashable, _Group] = {}
        self._pending = 0
        self._last_latency_s: float | None = None
        self._batches = self._dispatched = self._full = self._timeout = self._flushed = self._removed = 0
        self.max_batch_size = 0
        self.min_batch_size = 0
        self.batch_timeout_s = 0.0
        self.adaptive = adaptive
        self.length_bucketing = length_bucketing
        self.latency_budget_s: float | None = None
        self._size = 0
        self.set_limits(
            max_batch_size=max_batch_size,
            min_batch_size=min_batch_size,
            batch_timeout_s=batch_timeout_s,
            adaptive=adaptive,
            length_bucketing=length_bucketing,
            latency_budget_s=latency_budget_s,
        )
        if initial_batch_size is not None:
            self._size = self._clamp(initial_batch_size)

    # -- limits -------------------------------------------------------------------------------------------------

    def set_limits(
        self,
        *,
        max_batch_size: int | None = None,
        min_batch_size: int | None = None,
        batch_timeout_s: float | None = None,
        adaptive: bool | None = None,
        length_bucketing: bool | None = None,
        latency_budget_s: float | None = ...,  # type: ignore[assignment]
    ) -> None:
        """Change limits at runtime (the admin API and the tuner); unspecified ones stay as they are.

        A new timeout applies at once to requests already waiting; a new bucketing setting applies to arrivals.
        """
        new_max = self.max_batch_size if max_batch_size is None else int(max_batch_size)
        new_min = self.min_batch_size if min_batch_size is None else int(min_batch_size)
        new_timeout = self.batch_timeout_s if batch_timeout_s is None else float(batch_timeout_s)
        if new_max < 1 or new_min < 1:
            raise BatchingConfigError(f"batch sizes must be >= 1 (max_batch_size={new_max}, min_batch_size={new_min})")
        if new_min > new_max:
            raise BatchingConfigError(f"min_batch_size ({new_min}) exceeds max_batch_size ({new_max})")
        if not new_timeout >= 0:
            raise BatchingConfigError(f"batch_timeout_s must be >= 0, got {new_timeout}")
        budget = self.latency_budget_s if latency_budget_s is ... else latency_budget_s
        if budget is not None and not budget > 0:
            raise BatchingConfigError(f"latency_budget_s must be > 0 or None, got {budget}")
        self.max_batch_size, self.min_batch_size, self.batch_timeout_s = new_max, new_min, new_timeout
        self.latency_budget_s = budget
        if adaptive is not None:
            self.adaptive = bool(adaptive)
        if length_bucketing is not None:
            self.length_bucketing = bool(length_bucketing)
        # A static policy always runs at the maximum; an adaptive one keeps its learned size within the new bounds.
        self._size = new_max if (not self.adaptive or self._size == 0) else self._clamp(self._size)

    def _clamp(self, size: int) -> int:
        return max(self.min_batch_size, min(self.max_batch_size, int(size)))

    def record_latency(self, seconds: float) -> None:
        """The execution time of the last batch; growth pauses while it exceeds ``latency_budget_s``."""
        self._last_latency_s = max(0.0, float(seconds))

    # -- queue --------------------------------------------------------------------------------------------------

    @property
    def batch_size(self) -> int:
        """The current size threshold (adaptive, within the bounds)."""
        return self._size

    @property
    def pending(self) -> int:
        return self._pending

    def depth(self, group: Hashable) -> int:
        g = self._groups.get(group)
        return len(g.tickets) if g else 0

    def group_key(self, key: Hashable, length: int | None) -> Hashable:
        return (key, length_bucket(length)) if self.length_bucketing else (key, None)

    def add(self, ticket: Ticket, now: float) -> bool:
        """Queue ``ticket``; True when its group is now full (the shell should dispatch without waiting)."""
        gkey = (ticket.key, length_bucket(ticket.length)) if self.length_bucketing else (ticket.key, None)
        group = self._groups.get(gkey)
        if group is None:
            group = self._groups[gkey] = _Group()
        ticket.arrived = now
        ticket.group = gkey
        group.tickets.append(ticket)
        self._pending += 1
        return len(group.tickets) >= self._size

    def remove(self, ticket: Ticket) -> bool:
        """Take a waiting ticket out (its client went away); False when it already left or never came."""
        group = self._groups.get(ticket.group)
        if group is None:
            return False
        tickets = group.tickets
        for i, t in enumerate(tickets):
            if t is ticket:
                del tickets[i]
                break
        else:
            return False
        self._pending -= 1
        self._removed += 1
        if not tickets:
            del self._groups[ticket.group]
        return True

    # -- dispatch -----------------------------------------------------------------------------------------------

    def next_deadline(self, now: float) -> float | None:
        """When the next group falls due (never before ``now``), or None when nothing waits."""
        if not self._groups:
            return None
        oldest = min(g.tickets[0].arrived for g in self._groups.values())
        return max(now, oldest + self.batch_timeout_s)

    def has_ready(self, now: float) -> bool:
        size, timeout = self._size, self.batch_timeout_s
        return any(len(g.tickets) >= size or g.tickets[0].arrived + timeout <= now for g in self._groups.values())

    def pop_ready(self, now: float, limit: int | None = None) -> list[Batch]:
        """Every batch that is full or due at ``now``, oldest group first; at most ``limit`` batches."""
        out: list[Batch] = []
        if not self._groups:
            return out
        order = sorted(self._groups.items(), key=lambda kv: kv[1].tickets[0].arrived) if len(self._groups) > 1 else list(self._groups.items())
        for gkey, group in order:
            tickets = group.tickets
            while tickets and (limit is None or len(out) < limit):
                full = len(tickets) >= self._size
                if not full and tickets[0].arrived + self.batch_timeout_s > now:
                    break
                out.append(self._take(gkey, tickets, now, "full" if full else "timeout"))
            if not tickets:
                del self._groups[gkey]
            if limit is not None and len(out) >= limit:
                break
        return out

    def flush(self, now: float) -> list[Batch]:
        """Everything that waits, in batches of at most the current size (used when closing)."""
        out: list[Batch] = []
        for gkey, group in list(self._groups.items()):
            while group.tickets:
                out.append(self._take(gkey, group.tickets, now, "flush"))
            del self._groups[gkey]
        return out

    def _take(self, gkey: Hashable, tickets: list[Ticket], now: float, reason: DispatchReason) -> Batch:
        depth = len(tickets)
        if self.adaptive and reason != "flush":
            if depth > self._size:
                budget, last = self.latency_budget_s, self._last_latency_s
                if budget is None or last is None or last <= budget:
                    self._size = min(self.max_batch_size, self._size * 2)
            elif reason == "timeout" and depth * 2 <= self._size:
                self._size = max(self.min_batch_size, depth)
        n = min(depth, self._size)
        taken = tickets[:n]
        del tickets[:n]
        self._pending -= n
        self._batches += 1
        self._dispatched += n
        if reason == "full":
            self._full += 1
        elif reason == "timeout":
            self._timeout += 1
        else:
            self._flushed += 1
        return Batch(gkey, taken, reason, taken[0].arrived, now, self._size)

    def stats(self) -> PolicyStats:
        return PolicyStats(
            batch_size=self._size,
            batch_timeout_s=self.batch_timeout_s,
            pending=self._pending,
            groups=len(self._groups),
            batches=self._batches,
            dispatched=self._dispatched,
            full=self._full,
            timeout=self._timeout,
            flushed=self._flushed,
            removed=self._removed,
        )

    def groups(self) -> Iterable[Hashable]:
        return tuple(self._groups)


__all__ = [
    "Batch",
    "BatchingConfigError",
    "BatchingPolicy",
    "DispatchReason",
    "PolicyStats",
    "Ticket",
    "length_bucket",
]
