"""The sink interface, and the shared HTTP helpers of the HTTP sinks."""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable
from urllib.parse import urlsplit

import aiohttp

from alerting.alert import Notification
from alerting.errors import AlertingConfigError, DeliveryError

__all__ = ["Sink", "RETRYABLE_STATUSES"]

# Worth another try: the receiver is overloaded, restarting or asks us to come back.
RETRYABLE_STATUSES = frozenset({408, 425, 429})


@runtime_checkable
class Sink(Protocol):
    """Where notifications go. Implement ``name`` and ``async send``.

    ``send`` delivers every notification it is given or raises :class:`DeliveryError` (set
    ``retryable=False`` when another attempt cannot help). The dispatcher owns retries, buffering
    and counting; a sink only does I/O. Optional members the dispatcher uses when present:
    ``max_batch`` (how many notifications one ``send`` takes), ``default_policy()`` (the route
    policy that suits this receiver) and ``async aclose()``.
    """

    name: str

    async def send(self, notifications: Sequence[Notification]) -> None: ...


def check_url(name: str, url: str) -> str:
    parts = urlsplit(url) if isinstance(url, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
        raise AlertingConfigError(f"{name} must be an http(s) URL, got {url!r}")
    return url


def check_timeout(timeout_s: float) -> float:
    if not isinstance(timeout_s, (int, float)) or isinstance(timeout_s, bool) or not timeout_s > 0:
        raise AlertingConfigError(f"timeout_s must be a number > 0, got {timeout_s!r}")
    return float(timeout_s)


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class HttpPoster:
    """An aiohttp session made on first use (inside the running loop), closed by ``aclose``."""

    def __init__(
        self,
        *,
        sink_name: str,
        timeout_s: float,
        headers: Mapping[str, str] | None,
        session: aiohttp.ClientSession | None,
    ) -> None:
        self._sink_name = sink_name
        self._timeout = aiohttp.ClientTimeout(total=check_timeout(timeout_s))
        self._headers = {"User-Agent": "muai-alerting", **dict(headers or {})}
        self._session = session
        self._owns_session = session is None

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        merged = {**self._headers, "Content-Type": "application/json", **headers}
        try:
            async with self._session.post(url, data=body, headers=merged, timeout=self._timeout) as resp:
                text = await resp.text(errors="replace")
                status = resp.status
                retry_after = parse_retry_after(resp.headers.get("Retry-After"))
        except asyncio.TimeoutError as exc:
            raise DeliveryError(f"{self._sink_name}: POST {url} timed out") from exc
        except aiohttp.ClientError as exc:
            raise DeliveryError(f"{self._sink_name}: POST {url} failed: {exc!r}") from exc
        if 200 <= status < 300:
            return
        retryable = status >= 500 or status in RETRYABLE_STATUSES
        raise DeliveryError(
            f"{self._sink_name}: POST {url} answered {status}: {text[:200]!r}",
            retryable=retryable,
            status=status,
            retry_after=retry_after,
        )

    async def aclose(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
        self._session = None
