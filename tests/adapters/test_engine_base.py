"""The engine base: its one worker thread."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

import adapters.base
from adapters.base import GenerationRequest, ModelSpec
from adapters.echo import EchoEngine


def test_callers_on_two_loops_at_once_share_one_worker_thread(monkeypatch):
    """Defect (g): the worker pool was created lazily without a lock, so two loops asking at once could each create
    one: two workers, forward passes overlapping, one pool never shut down."""
    created = []
    second_started = threading.Event()

    class SlowToBuild(concurrent.futures.ThreadPoolExecutor):
        """A real pool whose construction leaves a wide window for a racing second construction."""

        def __init__(self, *args, **kwargs):
            created.append(self)
            if len(created) == 1:
                second_started.wait(0.5)
            else:
                second_started.set()
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(concurrent.futures, "ThreadPoolExecutor", SlowToBuild)
    monkeypatch.setattr(adapters.base, "ThreadPoolExecutor", SlowToBuild, raising=False)
    engine = EchoEngine()
    engine.load(ModelSpec("m", "unused"))
    start = threading.Barrier(2)
    answers = []

    def caller(i):
        start.wait(10)
        (res,) = asyncio.run(engine.generate([GenerationRequest(f"loop {i}")]))
        answers.append(res.text)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    try:
        assert sorted(answers) == ["loop 0", "loop 1"]
        assert len(created) == 1
    finally:
        engine.close()
        for pool in created:
            pool.shutdown(wait=False)
