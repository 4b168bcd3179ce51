"""RFC 3339 timestamps as Alertmanager writes and reads them."""

from __future__ import annotations

import datetime as _dt

# Go's zero time.Time: Alertmanager's webhook writes it for an alert that has no endsAt yet.
ZERO_TIME = "0001-01-01T00:00:00Z"


def format_time(ts: float | None) -> str:
    """Seconds since the epoch as RFC 3339 in UTC with millisecond precision and a ``Z`` zone.

    ``None`` (unset) becomes Go's zero time, ``0001-01-01T00:00:00Z``.
    """
    if ts is None:
        return ZERO_TIME
    dt = _dt.datetime.fromtimestamp(ts, tz=_dt.timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def format_optional(ts: float | None) -> str | None:
    """Like :func:`format_time`, but ``None`` stays ``None`` (JSON ``null``) for our own API."""
    return None if ts is None else format_time(ts)
