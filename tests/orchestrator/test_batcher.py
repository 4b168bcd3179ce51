"""The asyncio shell of the dynamic batcher, on a real event loop with a recording batch function."""

from __future__ import annotations

import asyncio
import contextvars
from dataclasses import dataclass

import pytest

from orchestrator.batcher import Batcher, BatchResultMismatchError
from orchestrator.errors import BatcherClosedError, MuaiError

pytestmark = pytest.mark.timeout(60)


@dataclass
class Out:
    value: int
    error: Exception | None = None


class Recorder:
    """A batch function that doubles its inputs and records the batches it saw; optionally gated."""

    def __init__(self, *, fail_on: set[int] | None = None, raise_exc: Exception | None = None, short: bool = False):
        self.batches: list[list[int]] = []
        self.contexts: list[list[object]] = []
        self.fail_on = fail_on or set()
        self.raise_exc = raise_exc
        self.short = short
        self.gate: asyncio.Event | None = None

    async def __call__(self, subs):
        self.batches.append([s.request for s in subs])
        self.contexts.append([s.context for s in subs])
        if self.gate is not None:
            await self.gate.wait()
        if self.raise_exc is not None:
            raise self.raise_exc
        out = [Out(s.request * 2, ValueError(f"bad {s.request}") if s.request in self.fail_on else None) for s in subs]
        return out[:-1] if self.short else out


async def _until(cond, timeout=10.0):
    """Poll a condition, yielding to the loop, with a deadline (no fixed sleeps)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, "condition not reached"
        await asyncio.sleep(0)


async def test_full_batch_dispatches_at_once_and_results_match_inputs():
    rec = Recorder()
    b = Batcher(rec, max_batch_size=8, batch_timeout_s=30.0, adaptive=False)
    outs = await asyncio.gather(*(b.submit(i) for i in range(8)))
    assert [o.value for o in outs] == [i * 2 for i in range(8)]
    assert rec.batches == [list(range(8))]
    await b.aclose()


async def test_incomplete_batch_leaves_on_its_timeout():
    rec = Recorder()
    b = Batcher(rec, max_batch_size=64, batch_timeout_s=0.01, adaptive=False)
    outs = await asyncio.gather(*(b.submit(i) for i in range(3)))
    assert [o.value for o in outs] == [0, 2, 4]
    assert rec.batches == [[0, 1, 2]]
    assert b.stats().policy.timeout == 1
    await b.aclose()


async def test_batches_never_exceed_the_size_and_every_request_is_answered_once():
    rec = Recorder()
    b = Batcher(rec, max_batch_size=5, batch_timeout_s=0.002, adaptive=True)
    outs = await asyncio.gather(*(b.submit(i) for i in range(53)))
    assert [o.value for o in outs] == [i * 2 for i in range(53)]
    assert all(1 <= len(batch) <= 5 for batch in rec.batches)
    assert sorted(x for batch in rec.batches for x in batch) == list(range(53))
    await b.aclose()


async def test_incompatible_keys_go_to_different_batches():
    rec = Recorder()
    b = Batcher(rec, max_batch_size=4, batch_timeout_s=0.005, adaptive=False)
    await asyncio.gather(*(b.submit(i, key=("m", i % 2)) for i in range(8)))
    assert sorted(rec.batches) == [[0, 2, 4, 6], [1, 3, 5, 7]]
    await b.aclose()


async def test_a_request_error_goes_only_to_that_request():
    rec = Recorder(fail_on={3})
    b = Batcher(rec, max_batch_size=6, batch_timeout_s=30.0, adaptive=False)
    outs = await asyncio.gather(*(b.submit(i) for i in range(6)), return_exceptions=True)
    assert isinstance(outs[3], ValueError) and str(outs[3]) == "bad 3"
    assert [o.value for i, o in enumerate(outs) if i != 3] == [0, 2, 4, 8, 10]
    await b.aclose()


async def test_a_batch_exception_goes_to_every_request():
    boom = RuntimeError("engine crashed")
    b = Batcher(Recorder(raise_exc=boom), max_batch_size=4, batch_timeout_s=30.0, adaptive=False)
    outs = await asyncio.gather(*(b.submit(i) for i in range(4)), return_exceptions=True)
    assert all(o is boom for o in outs)
    # The batcher carries on after a failed batch.
    b._run_batch = Recorder()
    assert (await asyncio.gather(*(b.submit(i) for i in range(4))))[1].value == 2
    await b.aclose()


async def test_outputs_must_match_inputs_one_to_one():
    b = Batcher(Recorder(short=True), max_batch_size=3, batch_timeout_s=30.0, adaptive=False)
    outs = await asyncio.gather(*(b.submit(i) for i in range(3)), return_exceptions=True)
    assert all(isinstance(o, BatchResultMismatchError) for o in outs)
    assert isinstance(outs[0], MuaiError)
    await b.aclose()


async def test_cancelled_waiter_is_removed_before_dispatch():
    rec = Recorder()
    b = Batcher(rec, max_batch_size=16, batch_timeout_s=30.0, adaptive=False)
    tasks = [asyncio.create_task(b.submit(i)) for i in range(3)]
    await _until(lambda: b.policy.pending == 3)
    tasks[1].cancel()
    await _until(lambda: b.policy.pending == 2)
    b.set_limits(batch_timeout_s=0.0)
    outs = await asyncio.gather(tasks[0], tasks[2])
    assert [o.value for o in outs] == [0, 4]
    assert rec.batches == [[0, 2]] and tasks[1].cancelled()
    assert b.stats().cancelled == 1
    await b.aclose()


async def test_requests_arriving_while_a_batch_runs_make_the_next_batch():
    rec = Recorder()
    rec.gate = asyncio.Event()
    b = Batcher(rec, max_batch_size=8, batch_timeout_s=0.0, adaptive=False)
    first = asyncio.create_task(b.submit(0))
    await _until(lambda: b.in_flight == 1)
    rest = [asyncio.create_task(b.submit(i)) for i in range(1, 6)]
    await _until(lambda: b.policy.pending == 5)
    rec.gate.set()
    await asyncio.gather(first, *rest)
    assert rec.batches == [[0], [1, 2, 3, 4, 5]]
    await b.aclose()


async def test_context_captured_at_submit_reaches_the_batch():
    var: contextvars.ContextVar[str] = contextvars.ContextVar("who", default="nobody")
    rec = Recorder()
    b = Batcher(rec, max_batch_size=3, batch_timeout_s=30.0, adaptive=False, capture_context=lambda: var.get())

    async def client(i):
        var.set(f"client-{i}")
        return await b.submit(i)

    await asyncio.gather(*(client(i) for i in range(3)))
    assert rec.contexts == [["client-0", "client-1", "client-2"]]
    await b.aclose()


async def test_runtime_limits_change_the_next_batches():
    rec = Recorder()
    b = Batcher(rec, max_batch_size=8, batch_timeout_s=30.0, adaptive=False)
    b.set_limits(max_batch_size=2)
    assert b.batch_size == 2
    await asyncio.gather(*(b.submit(i) for i in range(4)))
    assert [len(x) for x in rec.batches] == [2, 2]
    await b.aclose()


async def test_close_runs_what_waits_then_refuses_new_requests():
    rec = Recorder()
    b = Batcher(rec, max_batch_size=8, batch_timeout_s=30.0, adaptive=False)
    tasks = [asyncio.create_task(b.submit(i)) for i in range(3)]
    await _until(lambda: b.policy.pending == 3)
    await b.aclose()
    assert [t.result().value for t in tasks] == [0, 2, 4]
    with pytest.raises(BatcherClosedError):
        await b.submit(9)


async def test_close_can_fail_what_waits():
    b = Batcher(Recorder(), max_batch_size=8, batch_timeout_s=30.0, adaptive=False)
    tasks = [asyncio.create_task(b.submit(i)) for i in range(2)]
    await _until(lambda: b.policy.pending == 2)
    await b.aclose(cancel_pending=True)
    outs = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(o, BatcherClosedError) for o in outs)


async def test_one_client_is_never_held_back_by_adaptation():
    rec = Recorder()
    b = Batcher(rec, max_batch_size=32, batch_timeout_s=0.01, adaptive=True)
    for i in range(4):
        assert (await b.submit(i)).value == i * 2
    # After the first lonely request timed out, the size dropped to 1: later ones leave without waiting.
    assert b.batch_size == 1 and b.stats().policy.timeout == 1 and b.stats().policy.full == 3
    await b.aclose()
