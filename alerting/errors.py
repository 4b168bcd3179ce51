"""Errors raised by the alerting package.

One root, ``AlertingError``; each leaf also subclasses the builtin it resembles so callers that
catch ``ValueError`` or ``ConnectionError`` keep working.
"""

from __future__ import annotations

__all__ = ["AlertingError", "AlertingConfigError", "InvalidAlertError", "DeliveryError"]


class AlertingError(Exception):
    """Root of every error the alerting package raises."""


class AlertingConfigError(AlertingError, ValueError):
    """A constructor argument is out of bounds or inconsistent; raised when objects are built."""


class InvalidAlertError(AlertingError, ValueError):
    """Labels or annotations that Alertmanager would refuse (bad names, no ``alertname``)."""


class DeliveryError(AlertingError, ConnectionError):
    """A sink could not deliver a notification.

    ``retryable`` tells the dispatcher whether another attempt can help (a 5xx, a timeout, a refused
    connection) or not (a 4xx: the receiver rejected the payload). ``retry_after`` carries a
    receiver's ``Retry-After`` hint in seconds, when it gave one.
    """

    def __init__(
        self,
        message: str,
        *,
        retryable: bool = True,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status = status
        self.retry_after = retry_after
