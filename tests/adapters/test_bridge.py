"""The one streaming bridge, with real threads and a real second event loop as producers."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from support.waiting import apoll

from adapters.base import EngineUnavailableError
from adapters.bridge import ThreadStream


def _dropped() -> EngineUnavailableError:
    return EngineUnavailableError("dropped before it ran")


async def test_items_from_a_thread_arrive_in_order_and_the_end_ends_the_stream():
    stream: ThreadStream[int] = ThreadStream(_dropped)

    def produce(out: ThreadStream[int]) -> None:
        for i in range(50):
            out.put(i)

    with ThreadPoolExecutor(1) as pool:
        stream.watch(asyncio.get_running_loop().run_in_executor(pool, stream.produce_sync(produce)))
        assert [i async for i in stream.items()] == list(range(50))


async def test_a_producer_error_is_raised_to_the_consumer_after_the_items_before_it():
    stream: ThreadStream[int] = ThreadStream(_dropped)

    def produce(out: ThreadStream[int]) -> None:
        out.put(1)
        raise ValueError("broken")

    got = []
    with ThreadPoolExecutor(1) as pool:
        stream.watch(asyncio.get_running_loop().run_in_executor(pool, stream.produce_sync(produce)))
        with pytest.raises(ValueError, match="broken"):
            async for i in stream.items():
                got.append(i)
    assert got == [1]


async def test_leaving_the_stream_tells_a_thread_producer_to_stop():
    stream: ThreadStream[int] = ThreadStream(_dropped)
    stopped = threading.Event()

    def produce(out: ThreadStream[int]) -> None:
        i = 0
        while not out.cancelled.wait(0.001):
            out.put(i)
            i += 1
        stopped.set()

    with ThreadPoolExecutor(1) as pool:
        stream.watch(asyncio.get_running_loop().run_in_executor(pool, stream.produce_sync(produce)))
        items = stream.items()
        assert await items.__anext__() == 0
        await items.aclose()
        await apoll(stopped.is_set, what="the producer to stop")


async def test_work_dropped_before_it_ran_ends_the_stream_with_the_dropped_error():
    gate = threading.Event()
    stream: ThreadStream[int] = ThreadStream(_dropped)
    pool = ThreadPoolExecutor(1)
    loop = asyncio.get_running_loop()
    busy = loop.run_in_executor(pool, gate.wait, 30)  # the worker is taken, so the stream's work stays queued
    stream.watch(loop.run_in_executor(pool, stream.produce_sync(lambda out: out.put(1))))
    pool.shutdown(wait=False, cancel_futures=True)  # what Engine.close() does to queued work
    try:
        with pytest.raises(EngineUnavailableError, match="dropped before it ran"):
            [i async for i in stream.items()]
    finally:
        gate.set()
    await busy


async def test_a_producer_on_another_event_loop_is_pumped_and_cancelled_when_the_consumer_leaves():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    closed = threading.Event()

    async def source():
        try:
            i = 0
            while True:
                yield i
                i += 1
                await asyncio.sleep(0.001)
        finally:
            closed.set()

    try:
        stream: ThreadStream[int] = ThreadStream(_dropped)
        stream.watch(asyncio.run_coroutine_threadsafe(stream.pump(source()), loop))
        items = stream.items()
        assert [await items.__anext__() for _ in range(3)] == [0, 1, 2]
        await items.aclose()
        await apoll(closed.is_set, what="the source to be closed on its own loop")
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
