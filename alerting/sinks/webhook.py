"""The webhook sink: Alertmanager-shaped JSON, signed with HMAC-SHA256 when a secret is set."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping, Sequence

import aiohttp

from alerting.alert import Notification
from alerting.errors import AlertingConfigError
from alerting.ratelimit import Throttle
from alerting.render import webhook_payload
from alerting.sinks.base import HttpPoster, check_url

__all__ = ["WebhookSink", "SIGNATURE_HEADER", "sign", "verify_signature"]

SIGNATURE_HEADER = "X-MuAI-Signature"


def _key(secret: str | bytes) -> bytes:
    return secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)


def sign(secret: str | bytes, body: bytes) -> str:
    """The signature header value for ``body``: ``sha256=<hex HMAC-SHA256>``."""
    return "sha256=" + hmac.new(_key(secret), body, hashlib.sha256).hexdigest()


def verify_signature(secret: str | bytes, body: bytes, header: str | None) -> bool:
    """True when ``header`` is the signature of the exact ``body`` bytes (constant-time check)."""
    if not header:
        return False
    return hmac.compare_digest(sign(secret, body), header.strip())


class WebhookSink:
    """POSTs each notification as Alertmanager's webhook JSON (version "4") to ``url``.

    With ``secret`` set, every request carries ``X-MuAI-Signature: sha256=<hex>``, the HMAC-SHA256
    of the raw body. A non-2xx answer raises :class:`~alerting.errors.DeliveryError`, retryable for
    5xx, 408, 425 and 429. One notification per ``send`` so a retry never repeats a delivered one.
    """

    max_batch = 1

    def __init__(
        self,
        url: str,
        *,
        name: str = "webhook",
        secret: str | bytes | None = None,
        receiver: str = "muai",
        external_url: str = "",
        timeout_s: float = 10.0,
        max_alerts: int = 0,
        headers: Mapping[str, str] | None = None,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.name = name
        self.url = check_url("url", url)
        if secret is not None and not _key(secret):
            raise AlertingConfigError("secret must not be empty (use None for unsigned)")
        if not isinstance(max_alerts, int) or max_alerts < 0:
            raise AlertingConfigError(f"max_alerts must be an int >= 0, got {max_alerts!r}")
        self._secret = secret
        self.receiver = receiver
        self.external_url = external_url
        self.max_alerts = max_alerts
        self._http = HttpPoster(sink_name=name, timeout_s=timeout_s, headers=headers, session=session)

    def default_policy(self) -> Throttle:
        """Grouped and rate limited, like any receiver a person reads."""
        return Throttle()

    def render(self, notification: Notification) -> bytes:
        """The exact body bytes posted (and signed) for ``notification``."""
        payload = webhook_payload(
            notification,
            receiver=self.receiver,
            external_url=self.external_url,
            max_alerts=self.max_alerts,
        )
        return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8")

    async def send(self, notifications: Sequence[Notification]) -> None:
        for note in notifications:
            body = self.render(note)
            headers = {} if self._secret is None else {SIGNATURE_HEADER: sign(self._secret, body)}
            await self._http.post(self.url, body, headers)

    async def aclose(self) -> None:
        await self._http.aclose()
