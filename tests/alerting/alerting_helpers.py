"""Helpers for the alerting tests: a recording sink and alerts to feed it (the shared ones are in ``support``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from alerting import Alert, AlertState, Notification, Passthrough


class RecordingSink:
    """A real sink that keeps what it is sent (our own interface, not a fake of someone else's)."""

    max_batch = 64

    def __init__(self, name: str = "recorder", *, policy_factory: Callable[[], Any] | None = None) -> None:
        self.name = name
        self.batches: list[list[Notification]] = []
        self._policy_factory = policy_factory or (lambda: Passthrough(resend_interval_s=None))
        self.closed = False

    def default_policy(self) -> Any:
        return self._policy_factory()

    @property
    def notifications(self) -> list[Notification]:
        return [n for batch in self.batches for n in batch]

    async def send(self, notifications: Sequence[Notification]) -> None:
        self.batches.append(list(notifications))

    async def aclose(self) -> None:
        self.closed = True


def make_alert(
    name: str = "HighLatency",
    *,
    state: AlertState = AlertState.FIRING,
    at: float = 1_000.0,
    ends: float | None = None,
    **labels: str,
) -> Alert:
    return Alert(
        labels={"alertname": name, "severity": "warning", **labels},
        annotations={"summary": f"{name} is firing"},
        state=state,
        active_at=at,
        starts_at=at,
        ends_at=ends if state is AlertState.RESOLVED else None,
        updated_at=at,
    )
