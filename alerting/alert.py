"""The alert model and its lifecycle: pending -> firing -> resolved.

An :class:`Alert` is an immutable snapshot. Its identity is its label set: the fingerprint is
Alertmanager's own (FNV-1a 64 over the sorted label pairs, 16 hex digits), so the same labels give
the same fingerprint in every process, on every host, and in Alertmanager's API and webhooks. That
is what lets Alertmanager dedup alerts that several sidecars post.

:class:`AlertBook` is the pure state machine: the caller reports what it sees with ``observe`` and
gets back the transitions worth notifying (firing, resolved); pending alerts are kept but never
sent. Time is always passed in (seconds since the epoch), nothing here does I/O.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import math
import re
import types
from collections.abc import Mapping
from typing import Any

from alerting._time import format_optional
from alerting.errors import AlertingConfigError, InvalidAlertError

__all__ = ["AlertState", "Alert", "Notification", "AlertBook", "fingerprint", "normalize_labels"]

# Alertmanager refuses label names outside this pattern (Prometheus' legacy name validation).
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")

_FNV64_OFFSET = 14695981039346656037
_FNV64_PRIME = 1099511628211
_MASK64 = (1 << 64) - 1
_SEPARATOR = 0xFF  # cannot occur in UTF-8, so "a"+"bc" and "ab"+"c" hash apart


class AlertState(str, enum.Enum):
    """Where an alert is in its lifecycle."""

    PENDING = "pending"
    FIRING = "firing"
    RESOLVED = "resolved"


# Names other modules (the detectors' rules, say) may use for their own states.
_STATE_ALIASES = {
    "pending": AlertState.PENDING,
    "firing": AlertState.FIRING,
    "resolved": AlertState.RESOLVED,
    "inactive": AlertState.RESOLVED,
    "ok": AlertState.RESOLVED,
    "normal": AlertState.RESOLVED,
}


def _coerce_state(state: Any) -> AlertState:
    if isinstance(state, AlertState):
        return state
    for candidate in (state, getattr(state, "value", None), getattr(state, "name", None)):
        if isinstance(candidate, str) and candidate.lower() in _STATE_ALIASES:
            return _STATE_ALIASES[candidate.lower()]
    raise InvalidAlertError(
        f"unknown alert state {state!r}; expected one of {sorted(_STATE_ALIASES)}"
    )


def fingerprint(labels: Mapping[str, str]) -> str:
    """Alertmanager's fingerprint of a label set: 16 lowercase hex digits.

    Same algorithm as ``model.LabelSet.Fingerprint`` in prometheus/common, so it matches the
    ``fingerprint`` Alertmanager reports for the same labels.
    """
    h = _FNV64_OFFSET
    for name in sorted(labels):
        for part in (name, labels[name]):
            for byte in part.encode("utf-8"):
                h = ((h ^ byte) * _FNV64_PRIME) & _MASK64
            h = ((h ^ _SEPARATOR) * _FNV64_PRIME) & _MASK64
    return f"{h:016x}"


def normalize_labels(labels: Mapping[str, Any]) -> dict[str, str]:
    """Validated, sorted labels with string values; labels with empty values are dropped.

    An empty value means "no such label" to Prometheus and Alertmanager, so dropping it keeps the
    fingerprint equal to theirs. ``alertname`` is required.
    """
    out: dict[str, str] = {}
    for name in sorted(labels):
        if not isinstance(name, str) or not _LABEL_NAME.match(name):
            raise InvalidAlertError(f"invalid label name {name!r}: must match {_LABEL_NAME.pattern}")
        value = labels[name]
        if value is None:
            continue
        text = value if isinstance(value, str) else str(value)
        if text:
            out[name] = text
    if not out.get("alertname"):
        raise InvalidAlertError(f"labels need a non-empty 'alertname', got {dict(labels)!r}")
    return out


def _normalize_annotations(annotations: Mapping[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name in sorted(annotations):
        if not isinstance(name, str) or not name:
            raise InvalidAlertError(f"invalid annotation name {name!r}")
        value = annotations[name]
        if value is None:
            continue
        out[name] = value if isinstance(value, str) else _format_value(value)
    return out


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    return str(value)


@dataclasses.dataclass(frozen=True, slots=True)
class Alert:
    """An immutable snapshot of one alert.

    ``active_at`` is when the condition was first seen (pending since), ``starts_at`` when the alert
    began firing (what Alertmanager calls ``startsAt``), ``ends_at`` when it resolved. Labels are
    validated and sorted on construction and the fingerprint is derived from them.
    """

    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    state: AlertState
    active_at: float
    starts_at: float | None = None
    ends_at: float | None = None
    updated_at: float = 0.0
    generator_url: str = ""
    fingerprint: str = dataclasses.field(default="", compare=False)

    def __post_init__(self) -> None:
        labels = normalize_labels(self.labels)
        object.__setattr__(self, "labels", types.MappingProxyType(labels))
        object.__setattr__(
            self, "annotations", types.MappingProxyType(_normalize_annotations(self.annotations))
        )
        object.__setattr__(self, "state", _coerce_state(self.state))
        object.__setattr__(self, "fingerprint", fingerprint(labels))
        if self.state is not AlertState.PENDING and self.starts_at is None:
            raise InvalidAlertError(f"a {self.state.value} alert needs starts_at")
        if self.state is AlertState.RESOLVED and self.ends_at is None:
            raise InvalidAlertError("a resolved alert needs ends_at")

    @property
    def name(self) -> str:
        """The ``alertname`` label."""
        return self.labels["alertname"]

    @property
    def status(self) -> str:
        """``"firing"``, ``"resolved"`` or ``"pending"``: the word Alertmanager payloads use."""
        return self.state.value

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready view for the sidecar's ``GET /api/v1/alerts``."""
        return {
            "fingerprint": self.fingerprint,
            "state": self.state.value,
            "labels": dict(self.labels),
            "annotations": dict(self.annotations),
            "activeAt": format_optional(self.active_at),
            "startsAt": format_optional(self.starts_at),
            "endsAt": format_optional(self.ends_at),
            "updatedAt": format_optional(self.updated_at),
            "generatorURL": self.generator_url,
        }


@dataclasses.dataclass(frozen=True, slots=True)
class Notification:
    """One message for one receiver: a group of firing and/or resolved alerts.

    ``group_key`` and ``group_labels`` identify the group the way Alertmanager's ``groupKey`` and
    ``groupLabels`` do; they are empty for ungrouped streams (the Alertmanager sink's).
    ``created_at`` is the policy clock's time when the notification was made.
    """

    alerts: tuple[Alert, ...]
    group_key: str = ""
    group_labels: Mapping[str, str] = dataclasses.field(default_factory=dict)
    created_at: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "alerts", tuple(self.alerts))
        object.__setattr__(self, "group_labels", types.MappingProxyType(dict(self.group_labels)))
        if not self.alerts:
            raise InvalidAlertError("a notification needs at least one alert")
        for alert in self.alerts:
            if alert.state is AlertState.PENDING:
                raise InvalidAlertError(f"pending alert {alert.fingerprint} cannot be notified")

    @property
    def status(self) -> str:
        """``"firing"`` while any alert in it fires, else ``"resolved"`` (as Alertmanager does)."""
        return "firing" if any(a.state is AlertState.FIRING for a in self.alerts) else "resolved"


class AlertBook:
    """The alert lifecycle as a pure state machine, with a bounded history.

    ``observe`` takes either ``active=`` (the condition holds now or not; the book applies
    ``for_s``: an alert fires once its condition has held that long) or ``state=`` (the caller's
    rule already tracks pending/firing, e.g. a threshold rule with its own ``for``). It returns the
    transition to notify, a firing or a resolved snapshot, or ``None``. A pending alert whose
    condition clears is forgotten without a notification, as in Prometheus.

    ``external_labels`` are added to every alert (caller's labels win), like Prometheus' external
    labels; keep them equal across sidecars that should dedup in Alertmanager.
    """

    def __init__(
        self,
        *,
        for_s: float = 0.0,
        history_size: int = 500,
        max_active: int = 10_000,
        generator_url: str = "",
        external_labels: Mapping[str, str] | None = None,
    ) -> None:
        if not (isinstance(for_s, (int, float)) and math.isfinite(for_s) and for_s >= 0):
            raise AlertingConfigError(f"for_s must be a finite number >= 0, got {for_s!r}")
        if not isinstance(history_size, int) or history_size < 0:
            raise AlertingConfigError(f"history_size must be an int >= 0, got {history_size!r}")
        if not isinstance(max_active, int) or max_active < 1:
            raise AlertingConfigError(f"max_active must be an int >= 1, got {max_active!r}")
        self.for_s = float(for_s)
        self.max_active = max_active
        self.generator_url = generator_url
        self._external: dict[str, str] = {}
        for name, value in (external_labels or {}).items():
            if not isinstance(name, str) or not _LABEL_NAME.match(name):
                raise AlertingConfigError(f"invalid external label name {name!r}")
            self._external[name] = str(value)
        self._active: dict[str, Alert] = {}
        self._history: collections.deque[Alert] = collections.deque(maxlen=history_size)
        self._suppressed: dict[str, int] = {}
        self._transitions = {"firing": 0, "resolved": 0}

    def observe(
        self,
        labels: Mapping[str, Any],
        annotations: Mapping[str, Any] | None = None,
        *,
        now: float,
        active: bool | None = None,
        state: Any = None,
        value: float | None = None,
        threshold: float | None = None,
        for_s: float | None = None,
        generator_url: str | None = None,
    ) -> Alert | None:
        """Record one observation of the condition behind ``labels``; return a transition or None.

        ``value`` and ``threshold`` are added to the annotations (formatted), so subscribers see
        what was observed against what limit. ``annotations=None`` keeps the previous ones.
        """
        if (active is None) == (state is None):
            raise InvalidAlertError("give exactly one of active= or state=")
        target = None if state is None else _coerce_state(state)
        merged = {**self._external, **labels}
        norm = normalize_labels(merged)
        fp = fingerprint(norm)
        current = self._active.get(fp)
        wanted = bool(active) if target is None else target is not AlertState.RESOLVED

        if not wanted:
            if current is None:
                return None
            del self._active[fp]
            if current.state is not AlertState.FIRING:
                return None
            # Keep the annotations from while it fired: they describe what happened.
            resolved = dataclasses.replace(
                current,
                state=AlertState.RESOLVED,
                ends_at=now if current.starts_at is None else max(now, current.starts_at),
                updated_at=now,
            )
            self._history.append(resolved)
            self._transitions["resolved"] += 1
            return resolved

        ann = self._annotations(current, annotations, value, threshold)
        url = generator_url if generator_url is not None else self.generator_url
        if current is None:
            if len(self._active) >= self.max_active:
                self._suppressed["active_limit"] = self._suppressed.get("active_limit", 0) + 1
                return None
            current = Alert(
                labels=norm,
                annotations=ann,
                state=AlertState.PENDING,
                active_at=now,
                updated_at=now,
                generator_url=url,
            )
        else:
            current = dataclasses.replace(
                current, annotations=ann, updated_at=max(now, current.updated_at), generator_url=url
            )

        if target is None:
            hold = self.for_s if for_s is None else for_s
            fire = now - current.active_at >= hold
        else:
            fire = target is AlertState.FIRING
        if fire and current.state is AlertState.PENDING:
            current = dataclasses.replace(current, state=AlertState.FIRING, starts_at=now)
            self._active[fp] = current
            self._transitions["firing"] += 1
            return current
        self._active[fp] = current
        return None

    def resolve(self, fp: str, *, now: float) -> Alert | None:
        """Resolve the alert with fingerprint ``fp`` (e.g. its rule was removed); None if not firing."""
        current = self._active.get(fp)
        if current is None:
            return None
        return self.observe(current.labels, now=now, active=False)

    @staticmethod
    def _annotations(
        current: Alert | None,
        annotations: Mapping[str, Any] | None,
        value: float | None,
        threshold: float | None,
    ) -> dict[str, Any]:
        if annotations is None:
            ann: dict[str, Any] = dict(current.annotations) if current is not None else {}
        else:
            ann = dict(annotations)
        if value is not None:
            ann["value"] = value
        if threshold is not None:
            ann["threshold"] = threshold
        return ann

    def get(self, fp: str) -> Alert | None:
        """The active (pending or firing) alert with this fingerprint, if any."""
        return self._active.get(fp)

    def active(self) -> list[Alert]:
        """Pending and firing alerts, oldest first."""
        return sorted(self._active.values(), key=lambda a: (a.active_at, a.fingerprint))

    def firing(self) -> list[Alert]:
        """Firing alerts, oldest first."""
        return [a for a in self.active() if a.state is AlertState.FIRING]

    def history(self) -> list[Alert]:
        """Resolved alerts, newest first, at most ``history_size`` of them."""
        return list(reversed(self._history))

    def counts(self) -> dict[str, int]:
        """How many alerts are pending and firing now (for a ``muai_alerts`` gauge)."""
        out = {"pending": 0, "firing": 0}
        for alert in self._active.values():
            out[alert.state.value] += 1
        return out

    @property
    def transitions(self) -> dict[str, int]:
        """Totals of firing and resolved transitions since start (for counters)."""
        return dict(self._transitions)

    @property
    def suppressed(self) -> dict[str, int]:
        """New alerts refused, by reason (``active_limit``: ``max_active`` reached)."""
        return dict(self._suppressed)

    def to_json(self) -> dict[str, Any]:
        """The view served at ``GET /api/v1/alerts``: active alerts, history, counts."""
        return {
            "active": [a.to_json() for a in self.active()],
            "history": [a.to_json() for a in self.history()],
            "counts": self.counts(),
        }
