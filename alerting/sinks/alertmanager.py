"""The Alertmanager sink: API v2 ``POST /api/v2/alerts``."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence

import aiohttp

from alerting.alert import Alert, Notification
from alerting.errors import AlertingConfigError
from alerting.ratelimit import Passthrough
from alerting.render import alertmanager_alerts
from alerting.sinks.base import HttpPoster, check_url

__all__ = ["AlertmanagerSink"]


class AlertmanagerSink:
    """Posts alerts to one Alertmanager's API v2 (``<url>/api/v2/alerts``).

    Firing alerts carry ``endsAt = now + firing_ttl_s``; the route policy must re-post them more
    often than that (its default, :class:`~alerting.ratelimit.Passthrough`, re-posts every
    ``firing_ttl_s / 4``, capped at 60 s). For an Alertmanager cluster, make one sink per
    instance: Alertmanager expects every client to post to every peer.
    """

    max_batch = 64

    def __init__(
        self,
        url: str,
        *,
        name: str = "alertmanager",
        timeout_s: float = 10.0,
        firing_ttl_s: float = 300.0,
        headers: Mapping[str, str] | None = None,
        session: aiohttp.ClientSession | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self.url = check_url("url", url)
        self.endpoint = url.rstrip("/") + "/api/v2/alerts"
        if not (isinstance(firing_ttl_s, (int, float)) and math.isfinite(firing_ttl_s) and firing_ttl_s > 0):
            raise AlertingConfigError(f"firing_ttl_s must be a finite number > 0, got {firing_ttl_s!r}")
        self.firing_ttl_s = float(firing_ttl_s)
        self._clock = clock
        self._http = HttpPoster(sink_name=name, timeout_s=timeout_s, headers=headers, session=session)

    def default_policy(self) -> Passthrough:
        """Every change at once plus re-posts well inside ``firing_ttl_s``."""
        return Passthrough(resend_interval_s=min(60.0, self.firing_ttl_s / 4))

    def render(self, notifications: Sequence[Notification]) -> bytes:
        """The body posted for a batch; a later snapshot of the same alert replaces an earlier one."""
        latest: dict[str, Alert] = {}
        for note in notifications:
            for alert in note.alerts:
                latest[alert.fingerprint] = alert
        body = alertmanager_alerts(latest.values(), now=self._clock(), firing_ttl_s=self.firing_ttl_s)
        return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")

    async def send(self, notifications: Sequence[Notification]) -> None:
        await self._http.post(self.endpoint, self.render(notifications), {})

    async def aclose(self) -> None:
        await self._http.aclose()
