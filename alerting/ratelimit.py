"""Rate limiting and grouping of notifications: pure, synchronous, ``now`` passed in.

Two route policies share one small interface (:class:`Policy`):

* :class:`Throttle`, for receivers that a person reads (logs, webhooks): alerts are grouped by
  ``group_by`` labels and a group is notified after ``group_wait``, then at most once per
  ``group_interval`` when it changed, and once per ``repeat_interval`` while it keeps firing, the
  way Alertmanager's aggregation groups behave. Every notification also needs a token from a
  token bucket (``burst``, ``rate_per_s``), so a storm of alerts becomes a bounded number of
  notifications. What is held back is counted by reason.
* :class:`Passthrough`, for receivers that do their own grouping (Alertmanager): every state
  change goes out at once, and firing alerts are re-sent every ``resend_interval_s`` so they do
  not lapse at their ``endsAt``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

from alerting.alert import Alert, AlertState, Notification
from alerting.errors import AlertingConfigError

__all__ = ["Policy", "TokenBucket", "Throttle", "Passthrough", "ALL_LABELS"]

# Alertmanager's spelling for "group by every label", i.e. no grouping at all.
ALL_LABELS = "..."

_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


def _positive(name: str, value: float, *, allow_zero: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise AlertingConfigError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)


def _count_limit(name: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise AlertingConfigError(f"{name} must be an int >= 1, got {value!r}")
    return value


@runtime_checkable
class Policy(Protocol):
    """What a route does between an alert transition and its sink's buffer.

    ``offer`` takes a firing or resolved snapshot, ``flush`` returns the notifications due at
    ``now``, ``next_due`` says when ``flush`` next has work (``None``: nothing pending), and
    ``suppressed`` counts what was held back, by reason. All synchronous and free of I/O.

    A policy may also define ``undelivered(notification, now)``: the dispatcher calls it when it
    gave up delivering a notification the policy made (the receiver stayed unreachable past every
    retry), so the policy can send that state again rather than believe the receiver has it.
    """

    def offer(self, alert: Alert, now: float) -> None: ...

    def flush(self, now: float) -> list[Notification]: ...

    def next_due(self) -> float | None: ...

    @property
    def suppressed(self) -> Mapping[str, int]: ...


class TokenBucket:
    """A token bucket: at most ``capacity + rate_per_s * W`` takes in any window of ``W`` seconds.

    It starts full. Time going backwards (a stepped clock) refills nothing rather than failing.
    One bucket may be shared by several throttles to make the limit global.
    """

    def __init__(self, *, capacity: float, rate_per_s: float) -> None:
        self.capacity = _positive("capacity", capacity)
        if self.capacity < 1:
            raise AlertingConfigError(f"capacity must be >= 1, got {capacity!r}")
        self.rate_per_s = _positive("rate_per_s", rate_per_s)
        self._tokens = self.capacity
        self._last: float | None = None

    def _refill(self, now: float) -> None:
        if self._last is not None and now > self._last:
            self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.rate_per_s)
        if self._last is None or now > self._last:
            self._last = now

    def available(self, now: float) -> float:
        """Tokens available at ``now``."""
        self._refill(now)
        return self._tokens

    def try_take(self, now: float) -> bool:
        """Take one token if there is one."""
        self._refill(now)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


def group_key(group_labels: Mapping[str, str]) -> str:
    """An Alertmanager-style ``groupKey``: ``{}:{alertname="HighLatency", model="m"}``."""
    inner = ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in sorted(group_labels.items()))
    return "{}:{" + inner + "}"


@dataclasses.dataclass(slots=True)
class _Group:
    key: str
    labels: dict[str, str]
    due: float
    alerts: dict[str, Alert] = dataclasses.field(default_factory=dict)
    notified_firing: frozenset[str] = frozenset()
    last_sent: float | None = None


def _sort_key(alert: Alert) -> tuple[bool, float, str]:
    return (alert.state is not AlertState.FIRING, alert.starts_at or 0.0, alert.fingerprint)


class Throttle:
    """Alertmanager-like grouping plus a token bucket, for one receiver.

    A group is notified when it has news: the first time it has a firing alert (after
    ``group_wait_s``), when an alert joins it or resolves (checked every ``group_interval_s``),
    and every ``repeat_interval_s`` while alerts keep firing. Each notification carries the whole
    group and costs one token. Suppression reasons counted in ``suppressed``:

    * ``rate_limited``: a due notification found the bucket empty; it is retried one
      ``group_interval_s`` later with the group's then-current state, so nothing is lost, only late.

    A notification the dispatcher could not deliver comes back through :meth:`undelivered`, and the
    group's next flush sends its then-current state again (``undelivered`` counts them).
    * ``resolved_before_notify``: an alert resolved before the receiver ever heard it fire.
    * ``group_limit`` / ``group_full``: ``max_groups`` or ``max_alerts_per_group`` reached.
    """

    def __init__(
        self,
        *,
        group_by: Sequence[str] = ("alertname",),
        group_wait_s: float = 30.0,
        group_interval_s: float = 300.0,
        repeat_interval_s: float = 4 * 3600.0,
        burst: int = 10,
        rate_per_s: float = 10 / 60,
        bucket: TokenBucket | None = None,
        max_groups: int = 1000,
        max_alerts_per_group: int = 1000,
    ) -> None:
        if isinstance(group_by, str):
            raise AlertingConfigError(f"group_by must be a sequence of label names, got {group_by!r}")
        group_by = tuple(group_by)
        for name in group_by:
            if name != ALL_LABELS and not (isinstance(name, str) and _LABEL_NAME.match(name)):
                raise AlertingConfigError(f"group_by has an invalid label name {name!r}")
        if ALL_LABELS in group_by and len(group_by) > 1:
            raise AlertingConfigError(f"group_by {ALL_LABELS!r} must stand alone, got {group_by!r}")
        self.group_by = group_by
        self.group_wait_s = _positive("group_wait_s", group_wait_s, allow_zero=True)
        self.group_interval_s = _positive("group_interval_s", group_interval_s)
        self.repeat_interval_s = _positive("repeat_interval_s", repeat_interval_s)
        if self.repeat_interval_s < self.group_interval_s:
            raise AlertingConfigError(
                f"repeat_interval_s ({repeat_interval_s}) must be >= group_interval_s "
                f"({group_interval_s}): repeats are checked once per group interval"
            )
        self.bucket = bucket if bucket is not None else TokenBucket(capacity=burst, rate_per_s=rate_per_s)
        self.max_groups = _count_limit("max_groups", max_groups)
        self.max_alerts_per_group = _count_limit("max_alerts_per_group", max_alerts_per_group)
        self._groups: dict[str, _Group] = {}
        # When an emptied group last notified, kept one group interval: an alert that fires again at once makes a
        # new group of the same key, which must not notify sooner than the old one could have (a flapping alert
        # would otherwise notify every group_wait).
        self._recently_sent: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def _count(self, reason: str, n: int = 1) -> None:
        self._suppressed[reason] = self._suppressed.get(reason, 0) + n

    def _group_labels(self, labels: Mapping[str, str]) -> dict[str, str]:
        if self.group_by == (ALL_LABELS,):
            return dict(labels)
        return {k: labels[k] for k in self.group_by if k in labels}

    @property
    def suppressed(self) -> dict[str, int]:
        """Held-back notifications and alerts, by reason."""
        return dict(self._suppressed)

    @property
    def group_count(self) -> int:
        """Groups currently tracked."""
        return len(self._groups)

    def offer(self, alert: Alert, now: float) -> None:
        """Add a firing or resolved snapshot to its group; pending alerts are ignored."""
        if alert.state is AlertState.PENDING:
            return
        labels = self._group_labels(alert.labels)
        key = group_key(labels)
        group = self._groups.get(key)
        if group is None:
            if alert.state is AlertState.RESOLVED:
                # No group means no notification mentioned it: the receiver never saw it fire.
                self._count("resolved_before_notify")
                return
            if len(self._groups) >= self.max_groups:
                self._count("group_limit")
                return
            due = now + self.group_wait_s
            last = self._recently_sent.pop(key, None)
            if last is not None:
                due = max(due, last + self.group_interval_s)
            group = _Group(key=key, labels=labels, due=due, last_sent=last)
            self._groups[key] = group
        if alert.fingerprint not in group.alerts and len(group.alerts) >= self.max_alerts_per_group:
            self._count("group_full")
            return
        group.alerts[alert.fingerprint] = alert

    def next_due(self) -> float | None:
        """The earliest time a group needs a look, or None when no group is tracked."""
        return min((g.due for g in self._groups.values()), default=None)

    def flush(self, now: float) -> list[Notification]:
        """Notifications for every group that is due at ``now`` and has news."""
        out: list[Notification] = []
        for key in [k for k, g in self._groups.items() if g.due <= now]:
            group = self._groups[key]
            note = self._flush_group(group, now)
            if note is not None:
                out.append(note)
            if not group.alerts:
                del self._groups[key]
                if group.last_sent is not None:
                    self._recently_sent[key] = group.last_sent
        for key in [k for k, t in self._recently_sent.items() if now - t >= self.group_interval_s]:
            del self._recently_sent[key]
        return out

    def undelivered(self, notification: Notification, now: float) -> None:
        """Take back a notification the receiver never got, so its group's next flush sends the state again.

        Its firing alerts are no longer counted as heard (unless a newer notification of the group, made since,
        carries them as firing too); its resolved alerts come back, still counted as heard firing, so their
        resolution is sent. The group keeps its schedule: the next ``group_interval_s`` tick resends.
        """
        self._count("undelivered")
        resolved = [a for a in notification.alerts if a.state is AlertState.RESOLVED]
        group = self._groups.get(notification.group_key)
        if group is None:
            if not resolved:
                return  # every alert of it has resolved unheard since: nothing to tell
            if len(self._groups) >= self.max_groups:
                self._count("group_limit")
                return
            group = _Group(
                key=notification.group_key,
                labels=dict(notification.group_labels),
                due=notification.created_at + self.group_interval_s,
                last_sent=notification.created_at,
            )
            self._groups[notification.group_key] = group
        newer = group.last_sent is not None and group.last_sent > notification.created_at
        known = set(group.notified_firing)
        for alert in notification.alerts:
            if alert.state is not AlertState.FIRING:
                continue
            current = group.alerts.get(alert.fingerprint)
            if not (newer and current is not None and current.state is AlertState.FIRING):
                known.discard(alert.fingerprint)
        for alert in resolved:
            if alert.fingerprint not in group.alerts:  # a newer snapshot (it fired again) wins
                group.alerts[alert.fingerprint] = alert
                known.add(alert.fingerprint)
        group.notified_firing = frozenset(known)

    def _flush_group(self, group: _Group, now: float) -> Notification | None:
        group.due = now + self.group_interval_s
        firing: set[str] = set()
        resolved_known: list[str] = []
        for fp, alert in list(group.alerts.items()):
            if alert.state is AlertState.FIRING:
                firing.add(fp)
            elif fp in group.notified_firing:
                resolved_known.append(fp)
            else:
                del group.alerts[fp]
                self._count("resolved_before_notify")
        if group.last_sent is None:
            needed = bool(firing)
        elif not firing <= group.notified_firing or resolved_known:
            needed = True
        else:
            needed = bool(firing) and now - group.last_sent >= self.repeat_interval_s
        if not needed:
            return None
        if not self.bucket.try_take(now):
            self._count("rate_limited")
            return None
        note = Notification(
            alerts=tuple(sorted(group.alerts.values(), key=_sort_key)),
            group_key=group.key,
            group_labels=group.labels,
            created_at=now,
        )
        group.notified_firing = frozenset(firing)
        group.last_sent = now
        for fp in resolved_known:
            del group.alerts[fp]
        return note


class Passthrough:
    """Every state change at once, and firing alerts re-sent every ``resend_interval_s``.

    For Alertmanager, which groups, dedups and throttles by itself but drops an alert whose
    ``endsAt`` passes without news: resending keeps a firing alert alive there, and also heals a
    post that failed. ``resend_interval_s=None`` turns resending off. ``max_alerts`` bounds the
    firing alerts tracked (``alert_limit`` counts the ones refused).
    """

    def __init__(self, *, resend_interval_s: float | None = 60.0, max_alerts: int = 10_000) -> None:
        self.resend_interval_s = (
            None if resend_interval_s is None else _positive("resend_interval_s", resend_interval_s)
        )
        self.max_alerts = _count_limit("max_alerts", max_alerts)
        self._pending: dict[str, Alert] = {}
        self._pending_since: float | None = None
        self._firing: dict[str, tuple[Alert, float]] = {}
        self._suppressed: dict[str, int] = {}

    @property
    def suppressed(self) -> dict[str, int]:
        """Alerts refused, by reason."""
        return dict(self._suppressed)

    def offer(self, alert: Alert, now: float) -> None:
        """Queue a firing or resolved snapshot for the next flush; pending alerts are ignored."""
        fp = alert.fingerprint
        if alert.state is AlertState.PENDING:
            return
        if alert.state is AlertState.FIRING:
            if fp not in self._firing and len(self._firing) >= self.max_alerts:
                self._suppressed["alert_limit"] = self._suppressed.get("alert_limit", 0) + 1
                return
            # Marked as just sent: the flush that carries it is imminent.
            self._firing[fp] = (alert, now)
        else:
            self._firing.pop(fp, None)
        self._pending[fp] = alert
        if self._pending_since is None:
            self._pending_since = now

    def due_reposts(self, now: float) -> list[Alert]:
        """Firing alerts whose last send is at least ``resend_interval_s`` old, oldest first."""
        if self.resend_interval_s is None:
            return []
        horizon = now - self.resend_interval_s
        due = [
            (sent, alert)
            for fp, (alert, sent) in self._firing.items()
            if sent <= horizon and fp not in self._pending
        ]
        due.sort(key=lambda item: (item[0], item[1].fingerprint))
        return [alert for _, alert in due]

    def next_due(self) -> float | None:
        """Now-ish when changes wait, else when the oldest firing alert needs resending."""
        if self._pending_since is not None:
            return self._pending_since
        if self.resend_interval_s is None or not self._firing:
            return None
        return min(sent for _, sent in self._firing.values()) + self.resend_interval_s

    def flush(self, now: float) -> list[Notification]:
        """One notification with every pending change and every due resend, or nothing."""
        alerts = list(self._pending.values()) + self.due_reposts(now)
        self._pending.clear()
        self._pending_since = None
        if not alerts:
            return []
        for alert in alerts:
            if alert.state is AlertState.FIRING and alert.fingerprint in self._firing:
                self._firing[alert.fingerprint] = (alert, now)
        return [Notification(alerts=tuple(alerts), created_at=now)]
