"""The one streaming bridge: items produced on another thread (or another thread's event loop), consumed as an async
iterator on the caller's loop.

Every engine that streams uses it. The torch family produces on its worker thread (``produce_sync``); vLLM produces
on its own engine loop (``pump``). Either way:

- items and the end of the stream cross with ``call_soon_threadsafe`` onto the consumer's loop;
- the producer's future is watched: work an engine dropped before it ran (``close()`` cancels queued work) ends the
  stream with the engine's "unloaded" error instead of leaving the consumer waiting forever;
- when the consumer leaves (the iterator is closed, or its task cancelled) the ``cancelled`` event is set, which a
  thread producer polls between steps, and the producer's future is cancelled, which stops a loop producer.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any, Generic, TypeVar

__all__ = ["ThreadStream"]

T = TypeVar("T")


class _End:
    __slots__ = ("error",)

    def __init__(self, error: BaseException | None) -> None:
        self.error = error


class ThreadStream(Generic[T]):
    """A stream whose producer runs elsewhere; build it on the consumer's loop, iterate it with ``items()``.

    ``dropped`` builds the error the consumer gets when the producer's work was cancelled before it ended the stream.
    """

    def __init__(self, dropped: Callable[[], BaseException]) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._dropped = dropped
        self._future: concurrent.futures.Future[Any] | asyncio.Future[Any] | None = None
        self.cancelled = threading.Event()
        """Set when the consumer has left: a producer stops at its next step."""

    # ---------------------------------------------------------------------------------------- producer side
    def put(self, item: T) -> None:
        """Hand one item to the consumer; callable from any thread."""
        self._send(item)

    def end(self, error: BaseException | None = None) -> None:
        """End the stream, with the error the consumer raises (None: a normal end); callable from any thread."""
        self._send(_End(error))

    def _send(self, item: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the consumer's loop is closed: nobody is left to tell
            pass

    def produce_sync(self, fn: Callable[[ThreadStream[T]], None]) -> Callable[[], None]:
        """``fn(stream)`` wrapped for a worker thread: its return ends the stream, its exception fails it."""

        def run() -> None:
            try:
                fn(self)
            except BaseException as exc:  # handed to the consumer, which re-raises it
                self.end(exc)
            else:
                self.end()

        return run

    async def pump(self, source: AsyncIterator[T]) -> None:
        """Forward ``source`` (on the producer's loop) into the stream; closed explicitly when it ends or fails."""
        try:
            async with contextlib.aclosing(source):  # type: ignore[type-var]
                async for item in source:
                    self.put(item)
        except asyncio.CancelledError:
            # The consumer left (nobody reads any more) or the engine cut the work short: in the second case the
            # consumer is still waiting and gets an answer, not a CancelledError it did not ask for.
            self.end(self._dropped())
            raise
        except BaseException as exc:
            self.end(exc)
        else:
            self.end()

    def watch(self, future: concurrent.futures.Future[Any] | asyncio.Future[Any]) -> None:
        """The producer's future: cancelled before it ran, it ends the stream with ``dropped()``; leaving the
        stream cancels it."""
        self._future = future
        future.add_done_callback(self._producer_done)

    def _producer_done(self, future: Any) -> None:
        if future.cancelled():
            self.end(self._dropped())
        else:
            future.exception()  # retrieved, so an error the consumer already saw is not logged again

    # ---------------------------------------------------------------------------------------- consumer side
    async def items(self) -> AsyncIterator[T]:
        try:
            while True:
                item = await self._queue.get()
                if isinstance(item, _End):
                    if item.error is not None:
                        raise item.error
                    return
                yield item
        finally:
            self.cancelled.set()
            future = self._future
            if future is not None and not future.done():
                future.cancel()
