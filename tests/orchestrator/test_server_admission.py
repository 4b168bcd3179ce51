"""The admission core (pure, driven by a number for a clock) and its asyncio shell."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.admission import (
    DRAINING,
    QUEUE_FULL,
    QUEUE_WAIT,
    AdmissionQueue,
    AdmissionRejected,
    AdmissionState,
)


def test_admits_up_to_capacity_then_refuses_queue_full():
    state = AdmissionState(capacity=2)
    a = state.admit("m", 0.0)
    state.admit("m", 0.0)
    with pytest.raises(AdmissionRejected) as info:
        state.admit("m", 0.0)
    assert info.value.reason == QUEUE_FULL
    state.finish(a, 1.0)
    state.admit("m", 1.0)
    assert state.in_flight == 2


def test_draining_refuses_new_but_keeps_admitted():
    state = AdmissionState(capacity=4)
    ticket = state.admit("m", 0.0)
    state.drain()
    with pytest.raises(AdmissionRejected) as info:
        state.admit("m", 0.0)
    assert info.value.reason == DRAINING
    assert state.in_flight == 1
    state.start(ticket, 0.5)
    state.finish(ticket, 1.0)
    assert state.in_flight == 0


def test_queue_time_and_counts():
    state = AdmissionState(capacity=4)
    ticket = state.admit("m", 10.0)
    assert state.counts("m").waiting == 1
    assert state.start(ticket, 12.5) == pytest.approx(2.5)
    assert (state.counts("m").waiting, state.counts("m").running) == (0, 1)
    state.finish(ticket, 13.0)
    state.finish(ticket, 14.0)  # idempotent
    assert (state.counts("m").waiting, state.counts("m").running) == (0, 0)


def test_stalled_counts_from_busy_start_or_last_output():
    state = AdmissionState(capacity=4)
    state.progress(0.0)
    assert state.stalled_for(100.0) == 0.0  # idle is not stuck
    ticket = state.admit("m", 100.0)  # busy after a long idle period: not stuck at once
    assert state.stalled_for(100.5) == pytest.approx(0.5)
    state.progress(101.0)
    assert state.stalled_for(104.0) == pytest.approx(3.0)
    state.finish(ticket, 104.0)
    assert state.stalled_for(200.0) == 0.0


def test_capacity_can_shrink_without_evicting():
    state = AdmissionState(capacity=3)
    tickets = [state.admit("m", 0.0) for _ in range(3)]
    state.capacity = 1
    with pytest.raises(AdmissionRejected):
        state.admit("m", 0.0)
    for t in tickets[:2]:
        state.finish(t, 1.0)
    with pytest.raises(AdmissionRejected):
        state.admit("m", 1.0)
    state.finish(tickets[2], 1.0)
    state.admit("m", 1.0)


def test_wait_bound_refuses_while_the_oldest_waiting_request_has_waited_past_it():
    state = AdmissionState(capacity=100)
    running = state.admit("m", 0.0)
    state.start(running, 0.0)
    head = state.admit("m", 1.0)  # waits for a slot
    state.admit("m", 1.5, max_wait_s=1.0)  # the head has waited 0.5 s
    with pytest.raises(AdmissionRejected) as info:
        state.admit("m", 2.25, max_wait_s=1.0)
    assert info.value.reason == QUEUE_WAIT and "1.25 s" in str(info.value) and "server.max_queue_wait_s" in str(info.value)
    state.admit("n", 2.25, max_wait_s=1.0)  # per model: another model's line is its own
    state.admit("m", 2.25)  # no bound given: only the capacity counts
    # The head gets its slot: the next in line arrived at 1.5 s, so at 2.25 s the line has waited 0.75 s.
    state.finish(running, 2.25)
    state.start(head, 2.25)
    assert state.oldest_wait("m", 2.25) == pytest.approx(0.75)
    state.admit("m", 2.25, max_wait_s=1.0)


def test_wait_bound_skips_requests_that_left_the_line_and_reads_zero_when_none_waits():
    state = AdmissionState(capacity=100)
    gone = state.admit("m", 0.0)
    state.finish(gone, 0.1)  # cancelled while waiting
    later = state.admit("m", 5.0, max_wait_s=1.0)
    assert state.oldest_wait("m", 5.5) == pytest.approx(0.5)
    state.start(later, 5.5)
    assert state.oldest_wait("m", 100.0) == 0.0 and state.oldest_wait("unknown", 100.0) == 0.0
    state.admit("m", 100.0, max_wait_s=0.001)


@settings(max_examples=100, deadline=None)
@given(st.floats(0.01, 5.0), st.lists(st.tuples(st.sampled_from(["admit", "start", "finish"]), st.floats(0.0, 1.0)),
                                      max_size=80))
def test_wait_bound_property_admits_exactly_when_the_oldest_waiting_has_waited_at_most_the_bound(bound, ops):
    state = AdmissionState(capacity=1000)
    waiting: list = []  # FIFO, as the queue starts them
    now = 0.0
    for op, step in ops:
        now += step
        if op == "admit":
            oldest = now - waiting[0].admitted_at if waiting else 0.0
            try:
                waiting.append(state.admit("m", now, max_wait_s=bound))
                assert oldest <= bound
            except AdmissionRejected as exc:
                assert exc.reason == QUEUE_WAIT and oldest > bound
        elif waiting:
            ticket = waiting.pop(0)
            if op == "start":
                state.start(ticket, now)
            else:
                state.finish(ticket, now)


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 8), st.lists(st.tuples(st.sampled_from(["admit", "start", "finish"]), st.integers(0, 20)), max_size=80))
def test_never_more_than_capacity_and_counts_consistent(capacity, ops):
    state = AdmissionState(capacity=capacity)
    live = []
    now = 0.0
    for op, index in ops:
        now += 1.0
        if op == "admit":
            try:
                live.append(state.admit("m" if index % 2 else "n", now))
            except AdmissionRejected as exc:
                assert exc.reason == QUEUE_FULL
                assert state.in_flight == capacity
        elif live:
            ticket = live[index % len(live)]
            if op == "start" and ticket.started_at is None:
                assert state.start(ticket, now) >= 0
            elif op == "finish":
                state.finish(ticket, now)
                live.remove(ticket)
        assert state.in_flight <= capacity
        assert state.in_flight == len(live)
        snap = state.snapshot(now)
        assert snap.waiting + snap.running == len(live)
        assert snap.running == sum(1 for t in live if t.started_at is not None)


async def test_queue_limits_running_and_serves_fifo():
    queue = AdmissionQueue(capacity=10, running_limit=lambda model: 1)
    first = queue.admit("m")
    await queue.start(first)
    order: list[int] = []

    async def worker(i: int) -> None:
        ticket = queue.admit("m")
        await queue.start(ticket)
        order.append(i)
        queue.finish(ticket)

    tasks = [asyncio.create_task(worker(i)) for i in range(4)]
    await asyncio.sleep(0)
    assert queue.snapshot().waiting == 4
    queue.finish(first)
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3]
    assert queue.snapshot().in_flight == 0


async def test_cancelled_waiter_leaves_the_line_and_slot_is_not_lost():
    queue = AdmissionQueue(capacity=10, running_limit=lambda model: 1)
    holder = queue.admit("m")
    await queue.start(holder)
    ticket = queue.admit("m")
    waiter = asyncio.create_task(queue.start(ticket))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    queue.finish(ticket)
    queue.finish(holder)
    assert queue.snapshot().in_flight == 0
    again = queue.admit("m")
    await asyncio.wait_for(queue.start(again), 5)


async def test_wait_idle_returns_when_last_request_finishes():
    queue = AdmissionQueue(capacity=2)
    ticket = queue.admit("m")
    await queue.start(ticket)
    waiter = asyncio.create_task(queue.wait_idle(10))
    await asyncio.sleep(0)
    assert not waiter.done()
    queue.finish(ticket)
    assert await waiter is True
    assert await queue.wait_idle(0) is True


async def test_wait_idle_times_out_while_busy():
    queue = AdmissionQueue(capacity=2)
    queue.admit("m")
    assert await queue.wait_idle(0.01) is False
