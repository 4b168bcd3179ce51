"""The alert model: fingerprints, validation, and the pending -> firing -> resolved lifecycle."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alerting import (
    Alert,
    AlertBook,
    AlertingConfigError,
    AlertState,
    InvalidAlertError,
    Notification,
    fingerprint,
    normalize_labels,
)

LABELS = {"alertname": "HighLatency", "severity": "warning", "model": "llama", "gpu": "0"}

label_names = st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True)
label_values = st.text(min_size=1, max_size=12)


def test_fingerprint_is_alertmanagers_fnv1a64() -> None:
    # Alertmanager's fingerprint of the empty label set is the bare FNV-1a 64 offset basis.
    assert fingerprint({}) == "cbf29ce484222325"
    fp = fingerprint(LABELS)
    assert len(fp) == 16 and int(fp, 16) >= 0 and fp == fp.lower()


def test_fingerprint_ignores_order_and_separates_names_from_values() -> None:
    reordered = dict(reversed(list(LABELS.items())))
    assert fingerprint(reordered) == fingerprint(LABELS)
    assert fingerprint({"alertname": "ab", "c": "d"}) != fingerprint({"alertname": "a", "bc": "d"})
    assert fingerprint({**LABELS, "gpu": "1"}) != fingerprint(LABELS)


def test_fingerprint_is_stable_across_processes() -> None:
    code = "from alerting import fingerprint; print(fingerprint(%r))" % (LABELS,)
    seen = set()
    for seed in ("0", "1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
        assert out.returncode == 0, out.stderr
        seen.add(out.stdout.strip())
    assert seen == {fingerprint(LABELS)}


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(label_names, label_values, max_size=6), st.randoms(use_true_random=False))
def test_fingerprint_property_order_independent(labels: dict[str, str], rnd) -> None:
    items = list(labels.items())
    rnd.shuffle(items)
    assert fingerprint(dict(items)) == fingerprint(labels)


def test_normalize_labels_validates_and_drops_empty_values() -> None:
    assert normalize_labels({"alertname": "X", "gpu": 0, "model": "", "host": None}) == {
        "alertname": "X",
        "gpu": "0",
    }
    with pytest.raises(InvalidAlertError, match="alertname"):
        normalize_labels({"model": "m"})
    with pytest.raises(InvalidAlertError, match="invalid label name"):
        normalize_labels({"alertname": "X", "bad-name": "v"})
    with pytest.raises(ValueError):  # the builtin it resembles
        normalize_labels({"alertname": ""})


def test_alert_snapshot_is_immutable_and_json_ready() -> None:
    alert = Alert(labels=LABELS, annotations={"value": 0.123456789}, state="firing", active_at=10.0, starts_at=12.0)
    assert alert.state is AlertState.FIRING and alert.status == "firing"
    assert alert.fingerprint == fingerprint(LABELS)
    assert alert.annotations["value"] == "0.123457"
    with pytest.raises(TypeError):
        alert.labels["model"] = "other"  # type: ignore[index]
    view = alert.to_json()
    assert view["startsAt"] == "1970-01-01T00:00:12.000Z"
    assert view["endsAt"] is None and view["labels"] == dict(sorted(LABELS.items()))
    with pytest.raises(InvalidAlertError):
        Alert(labels=LABELS, annotations={}, state=AlertState.RESOLVED, active_at=1.0, starts_at=1.0)


def test_notification_refuses_pending_and_empty() -> None:
    pending = Alert(labels=LABELS, annotations={}, state=AlertState.PENDING, active_at=1.0)
    with pytest.raises(InvalidAlertError):
        Notification(alerts=(pending,))
    with pytest.raises(InvalidAlertError):
        Notification(alerts=())


def test_lifecycle_with_for_duration() -> None:
    book = AlertBook(for_s=30.0)
    assert book.observe(LABELS, {"summary": "slow"}, active=True, now=100.0, value=2.5, threshold=1.0) is None
    (pending,) = book.active()
    assert pending.state is AlertState.PENDING and pending.active_at == 100.0
    assert book.observe(LABELS, active=True, now=120.0, value=2.7) is None
    fired = book.observe(LABELS, active=True, now=130.0, value=3.0)
    assert fired is not None and fired.state is AlertState.FIRING
    assert fired.starts_at == 130.0 and fired.active_at == 100.0
    assert fired.annotations == {"summary": "slow", "threshold": "1", "value": "3"}
    assert book.observe(LABELS, active=True, now=140.0) is None  # already firing: no new transition
    assert book.counts() == {"pending": 0, "firing": 1}
    resolved = book.observe(LABELS, active=False, now=200.0, value=0.5)
    assert resolved is not None and resolved.state is AlertState.RESOLVED
    assert resolved.ends_at == 200.0 and resolved.starts_at == 130.0
    assert resolved.fingerprint == fired.fingerprint
    assert book.active() == [] and book.history() == [resolved]
    assert book.transitions == {"firing": 1, "resolved": 1}


def test_pending_that_clears_is_forgotten_quietly() -> None:
    book = AlertBook(for_s=60.0)
    book.observe(LABELS, active=True, now=0.0)
    assert book.observe(LABELS, active=False, now=10.0) is None
    assert book.active() == [] and book.history() == []
    assert book.observe(LABELS, active=False, now=11.0) is None


def test_explicit_state_from_a_rule_that_tracks_its_own_for() -> None:
    class RuleState:  # stands in for any enum-like object with a name, e.g. a detector's state
        def __init__(self, name: str) -> None:
            self.name = name

    book = AlertBook(for_s=999.0)  # ignored when state= is given
    assert book.observe(LABELS, state=RuleState("PENDING"), now=1.0) is None
    fired = book.observe(LABELS, state="firing", now=2.0)
    assert fired is not None and fired.starts_at == 2.0 and fired.active_at == 1.0
    resolved = book.observe(LABELS, state="inactive", now=3.0)
    assert resolved is not None and resolved.state is AlertState.RESOLVED
    with pytest.raises(InvalidAlertError):
        book.observe(LABELS, state="exploded", now=4.0)
    with pytest.raises(InvalidAlertError):
        book.observe(LABELS, now=4.0)
    with pytest.raises(InvalidAlertError):
        book.observe(LABELS, active=True, state="firing", now=4.0)


def test_refiring_after_resolve_is_a_new_episode() -> None:
    book = AlertBook()
    first = book.observe(LABELS, active=True, now=1.0)
    book.observe(LABELS, active=False, now=2.0)
    second = book.observe(LABELS, active=True, now=3.0)
    assert first is not None and second is not None
    assert second.starts_at == 3.0 and second.fingerprint == first.fingerprint


def test_history_is_bounded_newest_first_and_json() -> None:
    book = AlertBook(history_size=3, generator_url="http://sidecar:9400/api/v1/alerts")
    for i in range(5):
        labels = {**LABELS, "gpu": str(i)}
        book.observe(labels, active=True, now=float(i))
        book.observe(labels, active=False, now=float(i) + 0.5)
    assert [a.labels["gpu"] for a in book.history()] == ["4", "3", "2"]
    view = book.to_json()
    assert set(view) == {"active", "history", "counts"}
    assert view["history"][0]["state"] == "resolved"
    assert view["history"][0]["generatorURL"] == "http://sidecar:9400/api/v1/alerts"


def test_active_limit_and_external_labels() -> None:
    book = AlertBook(max_active=2, external_labels={"instance": "node-a", "severity": "info"})
    a = book.observe({"alertname": "A"}, active=True, now=1.0)
    assert a is not None and a.labels["instance"] == "node-a" and a.labels["severity"] == "info"
    b = book.observe({"alertname": "B", "severity": "critical"}, active=True, now=1.0)
    assert b is not None and b.labels["severity"] == "critical"  # the caller's label wins
    assert book.observe({"alertname": "C"}, active=True, now=1.0) is None
    assert book.suppressed == {"active_limit": 1}
    assert book.resolve(a.fingerprint, now=2.0) is not None


@pytest.mark.parametrize(
    "kwargs",
    [{"for_s": -1}, {"for_s": float("nan")}, {"history_size": -1}, {"max_active": 0},
     {"external_labels": {"bad-name": "x"}}],
)
def test_book_config_is_checked(kwargs) -> None:
    with pytest.raises(AlertingConfigError):
        AlertBook(**kwargs)
