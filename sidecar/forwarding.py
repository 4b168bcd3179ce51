"""Re-export received span batches to another OTLP/HTTP endpoint.

Ingestion hands each batch (the ExportTraceServiceRequest protobuf bytes) to :meth:`Forwarder.submit`, which
never waits: a queue bounded in batches (``queue_size``) and in bytes (``queue_bytes``; one batch may be tens
of MiB) takes it or it is dropped and counted. One worker task drains the queue.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import random

import aiohttp

from sidecar.config import ForwardingConfig

log = logging.getLogger(__name__)

_RETRYABLE = frozenset({429, 502, 503, 504})
_MAX_ATTEMPTS = 3


class Forwarder:
    """Bounded, non-blocking OTLP/HTTP re-exporter; counts what it sends, fails and drops."""

    def __init__(self, config: ForwardingConfig) -> None:
        if config.endpoint is None:
            raise ValueError("Forwarder needs forwarding.endpoint")
        self.config = config
        self.endpoint = config.endpoint
        self._queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=config.queue_size)
        self.max_bytes = config.queue_bytes
        self.queued_bytes = 0
        self.sent = 0
        self.failed = 0
        self.dropped = 0
        self._logged_failure = False

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def submit(self, payload: bytes) -> bool:
        """Queue one batch; ``False`` (and a count) when the queue is full, in batches or in bytes."""
        if self.queued_bytes + len(payload) > self.max_bytes:
            self.dropped += 1
            return False
        try:
            self._queue.put_nowait(payload)
        except asyncio.QueueFull:
            self.dropped += 1
            return False
        self.queued_bytes += len(payload)
        return True

    async def run(self) -> None:
        """The worker: forwards batches until cancelled."""
        headers = {"Content-Type": "application/x-protobuf", **self.config.headers}
        if self.config.compression == "gzip":
            headers["Content-Encoding"] = "gzip"
        timeout = aiohttp.ClientTimeout(total=self.config.timeout_s)
        async with aiohttp.ClientSession(timeout=timeout, headers=headers) as session:
            while True:
                payload = await self._queue.get()
                self.queued_bytes -= len(payload)
                if self.config.compression == "gzip":
                    payload = await asyncio.to_thread(gzip.compress, payload, 1)
                await self._send(session, payload)

    async def _send(self, session: aiohttp.ClientSession, payload: bytes) -> None:
        delay = 0.2
        for attempt in range(1, _MAX_ATTEMPTS + 1):
            try:
                async with session.post(self.endpoint, data=payload) as resp:
                    await resp.read()
                    if resp.status < 300:
                        self.sent += 1
                        self._logged_failure = False
                        return
                    reason = f"HTTP {resp.status}"
                    retryable = resp.status in _RETRYABLE
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                reason, retryable = f"{type(exc).__name__}: {exc}", True
            if not retryable or attempt == _MAX_ATTEMPTS:
                break
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay *= 2
        self.failed += 1
        if not self._logged_failure:  # once per outage, not once per batch
            log.warning("forwarding spans to %s failed (%s); counting further failures silently", self.endpoint, reason)
            self._logged_failure = True


__all__ = ["Forwarder"]
