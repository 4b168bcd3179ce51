"""The dynamic batcher: a thin asyncio shell around ``orchestrator.batching.BatchingPolicy``.

``await batcher.submit(request)`` queues one request and returns its own result. One dispatcher task per batcher
waits on an event, set when a group fills, when the single timer (armed for the earliest group deadline, never one
per request) fires, or when a batch finishes; it then asks the policy for the batches ready at ``loop.time()`` and
runs each through ``run_batch``. At most ``max_concurrent_batches`` run at once (default 1: engines run one forward
pass at a time anyway, and requests that arrive meanwhile make the next batch fuller instead of queueing small
batches in the engine's thread).

Every future gets exactly one outcome: its own result; its own error when the result carries one (``error_of``,
by default ``result.error`` as on ``GenerationResult``), so one bad request does not fail its neighbours; or the
batch's exception when ``run_batch`` raises (or returns a different number of results than it was given). A waiter
that is cancelled (client gone) is taken out of its group, or, when its batch is already taken but not yet
started, left out of the engine call. The caller's context (e.g. the OpenTelemetry span of the request) is captured
at submit time by ``capture_context`` and handed to ``run_batch`` on each ``Submission`` so spans cross the
asyncio boundary with their parent.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from orchestrator.batching import Batch, BatchingPolicy, PolicyStats, Ticket
from orchestrator.errors import BatcherClosedError, MuaiError

log = logging.getLogger(__name__)

Req = TypeVar("Req")
Res = TypeVar("Res")


class BatchResultMismatchError(MuaiError, RuntimeError):
    """``run_batch`` returned a different number of results than requests; every request of the batch gets it."""


class Submission(Ticket, Generic[Req]):
    """One queued request: what ``run_batch`` receives, in batch order."""

    __slots__ = ("request", "future", "context")

    def __init__(self, key: Hashable, length: int | None, request: Req, future: asyncio.Future, context: Any) -> None:
        # Ticket's fields set inline: this runs once per request on the hot path.
        self.key = key
        self.length = length
        self.arrived = 0.0
        self.group = None
        self.request = request
        self.future = future
        self.context = context


@dataclass(frozen=True, slots=True)
class BatcherStats:
    """The policy's counters plus the shell's: batches running now, requests dropped before dispatch."""

    policy: PolicyStats
    in_flight: int
    cancelled: int
    closed: bool


def _result_error(result: Any) -> BaseException | None:
    return getattr(result, "error", None)


class Batcher(Generic[Req, Res]):
    """Groups concurrent ``submit`` calls into batches for ``run_batch`` (see the module docstring)."""

    def __init__(
        self,
        run_batch: Callable[[Sequence[Submission[Req]]], Awaitable[Sequence[Res]]],
        *,
        max_batch_size: int = 16,
        min_batch_size: int = 1,
        batch_timeout_s: float = 0.005,
        adaptive: bool = True,
        length_bucketing: bool = False,
        latency_budget_s: float | None = None,
        max_concurrent_batches: int = 1,
        error_of: Callable[[Res], BaseException | None] = _result_error,
        capture_context: Callable[[], Any] | None = None,
        on_dispatch: Callable[[Batch, int], None] | None = None,
        name: str = "",
    ) -> None:
        if max_concurrent_batches < 1:
            raise ValueError(f"max_concurrent_batches must be >= 1, got {max_concurrent_batches}")
        self.policy = BatchingPolicy(
            max_batch_size=max_batch_size,
            min_batch_size=min_batch_size,
            batch_timeout_s=batch_timeout_s,
            adaptive=adaptive,
            length_bucketing=length_bucketing,
            latency_budget_s=latency_budget_s,
        )
        self.name = name
        self._run_batch = run_batch
        self._error_of = error_of
        self._capture = capture_context
        self._on_dispatch = on_dispatch
        self._max_concurrent = max_concurrent_batches
        self._in_flight = 0
        self._cancelled = 0
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._dispatcher: asyncio.Task | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when = 0.0
        self._due_at: float | None = None
        self._tasks: set[asyncio.Task] = set()

    @classmethod
    def from_config(cls, run_batch: Callable[..., Awaitable[Sequence[Res]]], config: Any, **kwargs: Any) -> Batcher:
        """Build from a ``BatchingConfig`` section (``enabled`` is the caller's business)."""
        return cls(
            run_batch,
            max_batch_size=config.max_batch_size,
            min_batch_size=config.min_batch_size,
            batch_timeout_s=config.batch_timeout_s,
            adaptive=config.adaptive,
            length_bucketing=config.length_bucketing,
            **kwargs,
        )

    # -- request path -------------------------------------------------------------------------------------------

    def _bind(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._wake = asyncio.Event()
        # An empty context: the dispatcher (and the batch tasks it starts) must not inherit the first caller's
        # span; each submission carries its own.
        self._dispatcher = loop.create_task(self._dispatch_loop(), name=f"muai-batcher-{self.name}", context=contextvars.Context())
        return loop

    async def submit(self, request: Req, *, key: Hashable = (), length: int | None = None) -> Res:
        """Queue ``request`` with requests of the same ``key`` (and length bucket); its own result or error."""
        if self._closing:
            raise BatcherClosedError(f"batcher {self.name!r} is closed")
        loop = self._loop
        if loop is None:
            loop = self._bind()
        fut = loop.create_future()
        sub = Submission(key, length, request, fut, self._capture() if self._capture is not None else None)
        if self.policy.add(sub, loop.time()):
            self._wake.set()  # type: ignore[union-attr]
        elif self._timer is None and self._in_flight < self._max_concurrent:
            # New arrivals are the youngest of their group, so an armed timer is never later than this deadline.
            self._arm(sub.arrived + self.policy.batch_timeout_s)
        try:
            return await fut
        except asyncio.CancelledError:
            if self.policy.remove(sub):
                self._cancelled += 1
            raise

    # -- dispatcher ---------------------------------------------------------------------------------------------

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            if self._timer_when == when:
                return
            self._timer.cancel()
        self._timer_when = when
        self._timer = self._loop.call_at(when, self._on_timer, when)  # type: ignore[union-attr]

    def _on_timer(self, when: float) -> None:
        self._timer = None
        # call_at may fire up to one clock resolution early; the policy must see the deadline as reached.
        self._due_at = when
        self._wake.set()  # type: ignore[union-attr]

    async def _dispatch_loop(self) -> None:
        wake = self._wake
        assert wake is not None
        while True:
            await wake.wait()
            wake.clear()
            try:
                self._dispatch()
            except Exception:  # pragma: no cover - a policy bug must not kill the loop silently
                log.exception("batcher %s: dispatch failed", self.name)

    def _dispatch(self) -> None:
        loop = self._loop
        assert loop is not None
        now = loop.time()
        if self._due_at is not None:
            now = max(now, self._due_at)
            self._due_at = None
        free = self._max_concurrent - self._in_flight
        if free > 0 and self.policy.pending:
            for batch in self.policy.pop_ready(now, limit=free):
                self._start(batch)
            free = self._max_concurrent - self._in_flight
        deadline = self.policy.next_deadline(now) if free > 0 else None
        if deadline is None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        else:
            self._arm(deadline)

    def _start(self, batch: Batch) -> None:
        self._in_flight += 1
        task = self._loop.create_task(self._run(batch), context=contextvars.Context())  # type: ignore[union-attr]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: Batch) -> None:
        live: list[Submission] = [s for s in batch.tickets if not s.future.done()]
        self._cancelled += len(batch.tickets) - len(live)
        loop = self._loop
        assert loop is not None
        started = loop.time()
        try:
            if self._on_dispatch is not None:
                try:
                    self._on_dispatch(batch, len(live))
                except Exception:
                    log.exception("batcher %s: on_dispatch hook failed", self.name)
            if not live:
                return
            try:
                results = await self._run_batch(live)
                if len(results) != len(live):
                    raise BatchResultMismatchError(
                        f"batcher {self.name!r}: run_batch returned {len(results)} results for {len(live)} requests"
                    )
            except asyncio.CancelledError:
                for s in live:
                    s.future.cancel()
                raise
            except Exception as exc:
                for s in live:
                    if not s.future.done():
                        s.future.set_exception(exc)
                return
            error_of = self._error_of
            for s, result in zip(live, results, strict=True):
                if s.future.done():
                    continue
                err = error_of(result)
                if err is None:
                    s.future.set_result(result)
                else:
                    s.future.set_exception(err)
        finally:
            self._in_flight -= 1
            self.policy.record_latency(loop.time() - started)
            if self._wake is not None:
                self._wake.set()

    # -- control ------------------------------------------------------------------------------------------------

    def set_limits(self, **limits: Any) -> None:
        """Change ``max_batch_size``, ``min_batch_size``, ``batch_timeout_s``, ``adaptive``, ``length_bucketing``
        or ``latency_budget_s`` while serving; waiting requests see the new limits at once."""
        self.policy.set_limits(**limits)
        if self._wake is not None:
            self._wake.set()

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop this batcher serves (bound on the first ``submit``); None before."""
        return self._loop

    @property
    def batch_size(self) -> int:
        return self.policy.batch_size

    @property
    def batch_timeout_s(self) -> float:
        return self.policy.batch_timeout_s

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def closed(self) -> bool:
        return self._closing

    def stats(self) -> BatcherStats:
        return BatcherStats(self.policy.stats(), self._in_flight, self._cancelled, self._closing)

    async def aclose(self, *, cancel_pending: bool = False) -> None:
        """Stop taking requests; run what waits (or fail it with ``BatcherClosedError``), then stop the loop."""
        if self._closing:
            return
        self._closing = True
        loop = self._loop
        if loop is None:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batches = self.policy.flush(loop.time())
        if cancel_pending:
            err = BatcherClosedError(f"batcher {self.name!r} closed before the request ran")
            for batch in batches:
                for s in batch.tickets:
                    if not s.future.done():
                        s.future.set_exception(err)
        else:
            for batch in batches:
                self._start(batch)
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            try:
                await self._dispatcher
            except asyncio.CancelledError:
                pass
            self._dispatcher = None


__all__ = ["BatchResultMismatchError", "Batcher", "BatcherStats", "Submission"]
