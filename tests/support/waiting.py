"""Polling with a deadline, the tests' only way to wait for something that happens elsewhere (no fixed sleeps).

``poll`` is for synchronous tests and fixtures, ``apoll`` for coroutines; both return the first truthy value the
condition gives and fail with an :class:`AssertionError` that says what was awaited and for how long.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn


class _Deadline:
    """When a poll gives up, and the failure message it gives up with."""

    def __init__(self, timeout: float, what: str, diagnose: Callable[[], str] | None) -> None:
        self.timeout = timeout
        self.what = what
        self.diagnose = diagnose
        self.at = time.monotonic() + timeout

    def passed(self) -> bool:
        return time.monotonic() > self.at

    def fail(self, last_error: BaseException | None) -> NoReturn:
        detail = f" (last error: {last_error!r})" if last_error else ""
        extra = f"\n{self.diagnose()}" if self.diagnose else ""
        raise AssertionError(f"timed out after {self.timeout:g}s waiting for {self.what}{detail}{extra}")


def poll(
    condition: Callable[[], Any],
    *,
    timeout: float = 10.0,
    interval: float = 0.02,
    what: str = "condition",
    retry_on: tuple[type[BaseException], ...] = (),
    diagnose: Callable[[], str] | None = None,
) -> Any:
    """Call ``condition`` until it returns something truthy, and return that; fail once ``timeout`` has passed.

    Exceptions in ``retry_on`` count as "not yet" (the last one is named in the failure); any other propagates.
    ``diagnose`` adds context (a process's log, the last answer seen) to the failure message.
    """
    deadline = _Deadline(timeout, what, diagnose)
    last_error: BaseException | None = None
    while True:
        try:
            value = condition()
        except retry_on as exc:
            last_error = exc
        else:
            if inspect.isawaitable(value):
                raise TypeError(f"{what}: the condition returned an awaitable; use apoll from a coroutine")
            if value:
                return value
            last_error = None
        if deadline.passed():
            deadline.fail(last_error)
        time.sleep(interval)


async def apoll(
    condition: Callable[[], Any | Awaitable[Any]],
    *,
    timeout: float = 10.0,
    interval: float = 0.02,
    what: str = "condition",
    retry_on: tuple[type[BaseException], ...] = (),
    diagnose: Callable[[], str] | None = None,
) -> Any:
    """:func:`poll` for coroutines: ``condition`` may be sync or async, and the loop keeps running between tries."""
    deadline = _Deadline(timeout, what, diagnose)
    last_error: BaseException | None = None
    while True:
        try:
            value = condition()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return value
            last_error = None
        except retry_on as exc:
            last_error = exc
        if deadline.passed():
            deadline.fail(last_error)
        await asyncio.sleep(interval)
