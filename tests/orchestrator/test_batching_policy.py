"""The pure batching policy: grouping, size and timeout dispatch, adaptation, and its invariants as properties."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.batching import BatchingPolicy, Ticket, length_bucket
from orchestrator.errors import BatchingConfigError, MuaiError


def _add(policy: BatchingPolicy, now: float, key="k", length=None) -> Ticket:
    t = Ticket(key, length)
    policy.add(t, now)
    return t


def test_full_group_dispatches_at_its_size():
    p = BatchingPolicy(max_batch_size=4, batch_timeout_s=1.0, adaptive=False)
    full = [p.add(Ticket("k"), 0.0) for _ in range(4)]
    assert full == [False, False, False, True]
    (batch,) = p.pop_ready(0.0)
    assert batch.reason == "full" and len(batch) == 4 and p.pending == 0


def test_oldest_request_sets_the_one_deadline():
    p = BatchingPolicy(max_batch_size=8, batch_timeout_s=0.5, adaptive=False)
    first = _add(p, 10.0)
    _add(p, 10.3)
    assert p.next_deadline(10.3) == pytest.approx(10.5)
    assert p.pop_ready(10.49) == []
    (batch,) = p.pop_ready(10.5)
    assert batch.reason == "timeout" and batch.tickets[0] is first and len(batch) == 2
    assert batch.opened_at == 10.0 and p.next_deadline(10.5) is None


def test_incompatible_requests_never_share_a_batch():
    p = BatchingPolicy(max_batch_size=8, batch_timeout_s=0.0, adaptive=False)
    for key in ("a", "b", "a", "c", "b"):
        _add(p, 0.0, key)
    batches = p.pop_ready(0.0)
    assert sorted((b.key[0], len(b)) for b in batches) == [("a", 2), ("b", 2), ("c", 1)]


def test_length_bucketing_groups_similar_lengths():
    assert [length_bucket(n) for n in (1, 2, 3, 4, 5, 8, 9, 16, 17)] == [0, 1, 2, 2, 3, 3, 4, 4, 5]
    p = BatchingPolicy(max_batch_size=8, batch_timeout_s=0.0, adaptive=False, length_bucketing=True)
    for n in (3, 4, 30, 31, 200):
        _add(p, 0.0, "k", n)
    sizes = sorted(len(b) for b in p.pop_ready(0.0))
    assert sizes == [1, 2, 2]
    off = BatchingPolicy(max_batch_size=8, batch_timeout_s=0.0, adaptive=False)
    for n in (3, 4, 30, 31, 200):
        _add(off, 0.0, "k", n)
    assert [len(b) for b in off.pop_ready(0.0)] == [5]


def test_adaptive_size_grows_when_deep_and_shrinks_when_shallow():
    p = BatchingPolicy(max_batch_size=32, min_batch_size=2, batch_timeout_s=0.01, adaptive=True, initial_batch_size=4)
    for _ in range(20):
        _add(p, 0.0)
    batches = p.pop_ready(0.0)
    # 20 waiting with size 4: deep, so the size doubles on each take while more wait than fit.
    assert [len(b) for b in batches] == [8, 12]
    assert p.batch_size == 16
    _add(p, 1.0)
    (b,) = p.pop_ready(1.01)
    assert b.reason == "timeout" and p.batch_size == 2  # one request after a full timeout: shallow, floored at min
    for _ in range(3):
        _add(p, 2.0)
    (b,) = p.pop_ready(2.0)
    assert len(b) == 3 and p.batch_size == 4  # the growth step covers the depth seen
    for _ in range(100):
        _add(p, 3.0)
    assert [len(b) for b in p.pop_ready(3.0)] == [8, 16, 32, 32]
    assert p.batch_size == 32 and p.pending == 12  # capped at max; the rest waits for company or its timeout


def test_latency_budget_pauses_growth():
    p = BatchingPolicy(max_batch_size=32, batch_timeout_s=0.01, initial_batch_size=4, latency_budget_s=0.1)
    p.record_latency(0.5)
    for _ in range(10):
        _add(p, 0.0)
    assert [len(b) for b in p.pop_ready(0.0)] == [4, 4]
    p.record_latency(0.05)
    for _ in range(10):
        _add(p, 1.0)
    assert p.pop_ready(1.0)[0].tickets and p.batch_size == 8


def test_static_policy_runs_at_max():
    p = BatchingPolicy(max_batch_size=8, batch_timeout_s=0.01, adaptive=False)
    _add(p, 0.0)
    p.pop_ready(1.0)
    assert p.batch_size == 8


def test_set_limits_applies_to_waiting_requests():
    p = BatchingPolicy(max_batch_size=8, batch_timeout_s=10.0, adaptive=False)
    for _ in range(3):
        _add(p, 0.0)
    assert p.pop_ready(1.0) == []
    p.set_limits(batch_timeout_s=0.5)
    assert p.next_deadline(1.0) == 1.0
    p.set_limits(max_batch_size=2)
    batches = p.pop_ready(0.1)
    assert [len(b) for b in batches] == [2] and p.pending == 1
    p.set_limits(adaptive=True, min_batch_size=2)
    assert p.batch_size == 2


@pytest.mark.parametrize(
    "limits",
    [dict(max_batch_size=0), dict(min_batch_size=9), dict(batch_timeout_s=-1.0), dict(latency_budget_s=0.0)],
)
def test_bad_limits_are_refused_and_change_nothing(limits):
    p = BatchingPolicy(max_batch_size=8, batch_timeout_s=0.1)
    with pytest.raises(BatchingConfigError) as info:
        p.set_limits(**limits)
    assert isinstance(info.value, MuaiError) and isinstance(info.value, ValueError)
    assert (p.max_batch_size, p.min_batch_size, p.batch_timeout_s) == (8, 1, 0.1)


def test_removed_request_leaves_its_group():
    p = BatchingPolicy(max_batch_size=4, batch_timeout_s=1.0, adaptive=False)
    a, b = _add(p, 0.0), _add(p, 0.0)
    assert p.remove(a) and not p.remove(a)
    (batch,) = p.pop_ready(1.0)
    assert batch.tickets == [b] and not p.remove(b)
    assert p.stats().removed == 1 and p.stats().dispatched == 1


def test_flush_takes_everything():
    p = BatchingPolicy(max_batch_size=3, batch_timeout_s=10.0, adaptive=False)
    for key in "aaaab":
        _add(p, 0.0, key)
    batches = p.flush(0.0)
    assert sorted(len(b) for b in batches) == [1, 1, 3] and all(b.reason == "flush" for b in batches)
    assert p.pending == 0 and p.next_deadline(0.0) is None


def test_limit_caps_batches_per_call_oldest_first():
    q = BatchingPolicy(max_batch_size=2, batch_timeout_s=0.0, adaptive=False)
    _add(q, 0.0, "early")
    _add(q, 1.0, "late")
    (only,) = q.pop_ready(1.0, limit=1)
    assert only.key[0] == "early" and q.pending == 1


# -- properties ---------------------------------------------------------------------------------------------------

_step = st.one_of(
    st.tuples(st.just("add"), st.integers(0, 2), st.integers(1, 300)),
    st.tuples(st.just("tick"), st.floats(0.0, 1.0), st.just(0)),
    st.tuples(st.just("remove"), st.integers(0, 10_000), st.just(0)),
    st.tuples(st.just("limits"), st.integers(1, 12), st.integers(1, 12)),
)


@settings(max_examples=150, deadline=None)
@given(
    steps=st.lists(_step, max_size=120),
    max_size=st.integers(1, 12),
    timeout=st.sampled_from([0.0, 0.001, 0.05, 0.2]),
    tick=st.sampled_from([0.001, 0.01, 0.1]),
    adaptive=st.booleans(),
    bucketing=st.booleans(),
)
def test_invariants_hold_under_any_schedule(steps, max_size, timeout, tick, adaptive, bucketing):
    """A batch never exceeds its size nor mixes groups; no request waits past the timeout plus one tick; every
    request leaves exactly once (dispatched or removed)."""
    p = BatchingPolicy(max_batch_size=max_size, batch_timeout_s=timeout, adaptive=adaptive, length_bucketing=bucketing)
    now = 0.0
    submitted: list[Ticket] = []
    removed: list[Ticket] = []
    dispatched: list[Ticket] = []

    def take(batches):
        for b in batches:
            assert 1 <= len(b) <= b.size <= p.max_batch_size
            assert len({t.group for t in b.tickets}) == 1
            assert all(b.taken_at - t.arrived <= timeout + tick + 1e-9 for t in b.tickets)
            dispatched.extend(b.tickets)

    for kind, a, b in steps:
        if kind == "add":
            t = Ticket(a, b)
            p.add(t, now)
            submitted.append(t)
        elif kind == "tick":
            # Time moves in steps of at most one tick; the shell asks the policy at every step.
            now += a * tick
        elif kind == "remove" and submitted:
            t = submitted[a % len(submitted)]
            if p.remove(t):
                removed.append(t)
        elif kind == "limits":
            p.set_limits(max_batch_size=max(a, b), min_batch_size=min(a, b))
        take(p.pop_ready(now))
        assert p.pending == len(submitted) - len(removed) - len(dispatched)
        assert min(p.min_batch_size, p.max_batch_size) <= p.batch_size <= p.max_batch_size
    end = now + timeout + tick
    while now < end:
        now = min(end, now + tick)
        take(p.pop_ready(now))
    assert p.pending == 0
    ids = [id(t) for t in dispatched + removed]
    assert len(ids) == len(set(ids)) == len(submitted)


@settings(max_examples=100, deadline=None)
@given(
    arrivals=st.lists(st.tuples(st.floats(0.0, 0.05), st.integers(0, 1)), min_size=1, max_size=80),
    timeouts=st.lists(st.sampled_from([0.0, 0.01, 0.1, 1.0]), min_size=1, max_size=5),
    limit=st.sampled_from([None, 1, 2]),
)
def test_no_request_lost_or_answered_twice_with_runtime_changes(arrivals, timeouts, limit):
    p = BatchingPolicy(max_batch_size=4, batch_timeout_s=timeouts[0])
    now, seen, held = 0.0, set(), []  # tickets held so that id() stays unique
    for i, (gap, key) in enumerate(arrivals):
        now += gap
        held.append(Ticket(key))
        p.add(held[-1], now)
        if i % 7 == 0:
            p.set_limits(batch_timeout_s=timeouts[i % len(timeouts)])
        for b in p.pop_ready(now, limit=limit):
            assert len(b) <= b.size <= p.max_batch_size
            for t in b.tickets:
                assert id(t) not in seen
                seen.add(id(t))
    for b in p.flush(now):
        for t in b.tickets:
            assert id(t) not in seen
            seen.add(id(t))
    assert len(seen) == len(held) and p.pending == 0
