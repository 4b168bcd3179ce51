"""The fallback chain over real engines: the echo engine's fault injection and the torch engine on a tiny model.

No engine library is mocked: "vLLM absent" is an engine whose ``available()`` says no (the echo engine with its
``unavailable`` fault), and load/inference failures are the echo engine's injected faults.
"""

from __future__ import annotations

import asyncio
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from support.waiting import apoll

from adapters import registry
from adapters.base import (
    EngineUnavailableError,
    GenerationRequest,
    InferenceError,
    InvalidRequestError,
    ModelLoadError,
    ModelSpec,
    SamplingParams,
    StreamChunk,
)
from adapters.echo import EchoEngine, EchoFaults
from adapters.fallback import ChainConfigError, FallbackChain, FallbackEvent

REQ = [GenerationRequest("one two three", SamplingParams(max_new_tokens=4))]


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class Recorder:
    def __init__(self) -> None:
        self.events: list[FallbackEvent] = []

    def __call__(self, event: FallbackEvent) -> None:
        self.events.append(event)


def echo_factory(name, settings):
    """Several independent echo engines under different preference names (all real EchoEngines)."""
    return EchoEngine(settings)


def echo_chain(faults: dict[str, EchoFaults], *, clock=None, rec=None, recov=None, **kw) -> FallbackChain:
    names = list(faults)
    return FallbackChain(
        ModelSpec("m", "unused"), names, {n: {"faults": f} for n, f in faults.items()},
        on_fallback=rec, on_recovery=recov, reprobe_after_s=10.0, clock=clock or Clock(),
        engine_factory=echo_factory, **kw,
    )


@pytest.fixture
def llama_spec(tiny_llama_dir):
    return ModelSpec("tiny-llama", str(tiny_llama_dir), device="cpu")


def torch_chain(spec, faults, clock, rec, recov=None) -> FallbackChain:
    return FallbackChain(spec, ["echo", "torch"], {"echo": {"faults": faults}, "torch": {}}, on_fallback=rec,
                         on_recovery=recov, reprobe_after_s=30.0, clock=clock)


async def test_absent_preferred_engine_falls_back_to_torch_and_comes_back(llama_spec):
    faults, clock, rec, recov = EchoFaults(unavailable="vllm is not installed here"), Clock(), Recorder(), Recorder()
    chain = torch_chain(llama_spec, faults, clock, rec, recov)
    chain.load()
    assert chain.engine_name == "torch"
    (res,) = await chain.generate(REQ)
    assert res.error is None and res.completion_tokens == 4  # answered by the tiny model
    assert [(e.from_engine, e.to_engine, e.reason) for e in rec.events] == [("echo", "torch", "unavailable")]
    assert "vllm is not installed here" in rec.events[0].detail
    assert chain.degraded and "echo unavailable: vllm is not installed here" in chain.degraded_reasons[0]
    status = chain.status()
    assert status.active_engine == "torch" and status.degraded
    assert status.engines["echo"].available is False
    assert status.engines["echo"].reason == "vllm is not installed here"
    assert status.engines["torch"].state == "active"
    assert status.fallbacks == 1

    # The fault clears; nothing happens before the back-off is over, then a re-probe brings echo back.
    faults.clear()
    assert not chain.reprobe_due()
    clock.t += 31
    assert chain.reprobe_due()
    assert await chain.reprobe() is True
    assert chain.engine_name == "echo" and not chain.degraded
    assert [(e.from_engine, e.to_engine, e.reason) for e in recov.events] == [("torch", "echo", "recovered")]
    (res,) = await chain.generate(REQ)
    assert res.text == "one two three"
    assert len(rec.events) == 1
    chain.close()


async def test_load_failure_falls_back(llama_spec):
    faults, rec = EchoFaults(fail_load=True), Recorder()
    chain = torch_chain(llama_spec, faults, Clock(), rec)
    chain.load()
    (res,) = await chain.generate(REQ)
    assert chain.engine_name == "torch" and res.completion_tokens == 4
    assert [(e.from_engine, e.to_engine, e.reason) for e in rec.events] == [("echo", "torch", "load_error")]
    assert "injected load failure" in chain.degraded_reasons[0]
    assert chain.status().engines["echo"].state == "failed"
    chain.close()


async def test_inference_failure_retries_on_the_next_engine_and_reprobes_in_the_background(llama_spec):
    faults, clock, rec = EchoFaults(fail_generate_always=True), Clock(), Recorder()
    chain = torch_chain(llama_spec, faults, clock, rec)
    chain.load()
    assert chain.engine_name == "echo"
    (res,) = await chain.generate(REQ)  # echo raises, torch answers the same request
    assert res.error is None and chain.engine_name == "torch"
    assert [(e.from_engine, e.to_engine, e.reason) for e in rec.events] == [("echo", "torch", "inference_error")]
    assert "injected generate failure" in chain.degraded_reasons[0]
    # The fault clears; the first request after the back-off is served by torch and re-probes echo meanwhile.
    faults.clear()
    clock.t += 31
    (res,) = await chain.generate(REQ)  # served by torch; starts the re-probe in the background
    assert res.error is None
    assert await chain.wait_reprobe() is True
    assert chain.engine_name == "echo" and chain.degraded_reasons == []
    (res,) = await chain.generate(REQ)
    assert res.text == "one two three"
    chain.close()


async def test_non_retryable_errors_do_not_fall_back(llama_spec):
    rec = Recorder()
    chain = FallbackChain(
        ModelSpec("tiny", llama_spec.path, device="cpu", max_model_len=24), ["torch", "echo"], {},
        on_fallback=rec, clock=Clock(),
    )
    chain.load()
    (res,) = await chain.generate([GenerationRequest("word " * 40, SamplingParams(max_new_tokens=4))])
    assert isinstance(res.error, InvalidRequestError)
    with pytest.raises(InvalidRequestError):
        await chain.embed(["x"])
    assert chain.engine_name == "torch" and rec.events == []
    chain.close()


async def test_backoff_doubles_while_the_engine_keeps_failing():
    clock, rec = Clock(), Recorder()
    primary, backup = EchoFaults(fail_load=True), EchoFaults()
    chain = echo_chain({"primary": primary, "backup": backup}, clock=clock, rec=rec)
    chain.load()
    assert chain.engine_name == "backup"
    assert chain.status().engines["primary"].retry_in_s == 10.0
    clock.t += 10
    assert await chain.reprobe() is False
    assert chain.status().engines["primary"].retry_in_s == 20.0
    assert chain.status().engines["primary"].failures == 2
    clock.t += 19
    assert not chain.reprobe_due()
    primary.clear()
    clock.t += 1
    assert await chain.reprobe() is True
    assert chain.engine_name == "primary" and chain.status().engines["primary"].failures == 0
    assert len(rec.events) == 1  # failed re-probes do not count as new fallbacks
    chain.close()


def test_status_is_typed_and_its_json_is_the_shape_operators_read():
    clock = Clock()
    chain = echo_chain({"primary": EchoFaults(fail_load=True), "backup": EchoFaults()}, clock=clock, rec=Recorder())
    chain.load()
    status = chain.status()
    assert status.active_engine == "backup" and status.degraded and status.preference == ("primary", "backup")
    assert status.engines["primary"].failures == 1 and status.engines["backup"].retry_in_s is None
    as_json = json.loads(json.dumps(status.as_dict()))
    assert set(as_json) == {"model", "active_engine", "preference", "degraded", "degraded_reasons", "engines",
                            "engine_status", "fallbacks"}
    primary = as_json["engines"]["primary"]
    assert "injected load failure" in primary.pop("reason")
    assert primary == {"state": "failed", "available": True, "failures": 1, "retry_in_s": 10.0}
    assert as_json["engine_status"]["engine"] == "echo" and as_json["degraded_reasons"] == list(status.degraded_reasons)
    chain.close()


async def test_concurrent_failures_switch_once_and_every_request_is_answered():
    rec = Recorder()
    chain = echo_chain({"a": EchoFaults(fail_generate_always=True), "b": EchoFaults()}, rec=rec)
    chain.load()
    results = await asyncio.gather(*(chain.generate([GenerationRequest(f"r{i}")]) for i in range(8)))
    assert [r[0].text for r in results] == [f"r{i}" for i in range(8)]
    assert chain.engine_name == "b"
    assert [e.reason for e in rec.events] == ["inference_error"]
    chain.close()


async def test_no_engine_left_raises_with_every_reason():
    rec = Recorder()
    chain = echo_chain({"a": EchoFaults(fail_generate_always=True), "b": EchoFaults(unavailable="nope")}, rec=rec)
    chain.load()
    with pytest.raises(InferenceError):
        await chain.generate(REQ)
    assert chain.engine_name is None
    assert rec.events[0].to_engine is None
    with pytest.raises(EngineUnavailableError, match="no engine can serve model 'm'") as info:
        await chain.generate(REQ)
    assert "a: " in str(info.value) and "b: " in str(info.value)
    assert chain.degraded
    chain.close()


def test_nothing_loadable_at_all():
    chain = echo_chain({"a": EchoFaults(unavailable="x"), "b": EchoFaults(fail_load=True)})
    with pytest.raises(EngineUnavailableError, match="no engine can serve"):
        chain.load()


def test_missing_model_path_is_one_clear_error_not_a_fallback(tmp_path):
    rec = Recorder()
    chain = FallbackChain(ModelSpec("ghost", str(tmp_path / "nope")), ["torch", "echo"], {}, on_fallback=rec)
    with pytest.raises(ModelLoadError, match="does not exist"):
        chain.load()
    assert rec.events == [] and chain.engine_name is None


async def test_streaming_falls_back_before_the_first_chunk():
    chain = echo_chain({"a": EchoFaults(fail_generate_times=1), "b": EchoFaults()})
    chain.load()
    chunks = [c async for c in chain.generate_stream(GenerationRequest("x y"))]
    assert "".join(c.text for c in chunks) == "x y" and chain.engine_name == "b"
    chain.close()


async def test_embed_falls_back_too():
    chain = echo_chain({"a": EchoFaults(fail_generate_always=True), "b": EchoFaults()})
    chain.load()
    (vec,) = await chain.embed(["hello"])
    assert len(vec.vector) == 8 and chain.engine_name == "b"
    chain.close()


async def test_disabled_engines_are_skipped_silently():
    rec = Recorder()
    chain = FallbackChain(ModelSpec("m", "unused"), ["torch", "echo"], {"torch": {"enabled": False}}, on_fallback=rec)
    chain.load()
    assert chain.engine_name == "echo" and not chain.degraded and rec.events == []
    assert chain.status().engines["torch"].state == "disabled"
    chain.close()


async def test_runtime_changes_reach_the_next_engine_too():
    chain = echo_chain({"a": EchoFaults(fail_generate_times=1), "b": EchoFaults()})
    chain.load()
    chain.reconfigure(inject_delay_s=0.01)
    assert chain.status().engine_status["inject_delay_s"] == 0.01
    await chain.generate(REQ)
    assert chain.engine_name == "b" and chain.status().engine_status["inject_delay_s"] == 0.01
    assert chain.capabilities.streaming
    chain.close()


async def test_a_broken_hook_never_breaks_serving():
    def boom(event):
        raise RuntimeError("telemetry down")

    chain = echo_chain({"a": EchoFaults(fail_generate_times=1), "b": EchoFaults()}, rec=boom)
    chain.load()
    (res,) = await chain.generate(REQ)
    assert res.text == "one two three"
    chain.close()


def test_bad_preferences_are_refused_clearly():
    with pytest.raises(registry.UnknownEngineError, match="known engines: vllm, deepspeed, onnxruntime, torch, echo"):
        FallbackChain(ModelSpec("m", "p"), ["tensorrt", "torch"], {})
    with pytest.raises(ChainConfigError, match="twice"):
        FallbackChain(ModelSpec("m", "p"), ["torch", "torch"], {})
    with pytest.raises(ChainConfigError, match="empty"):
        FallbackChain(ModelSpec("m", "p"), [], {})
    with pytest.raises(ValueError):
        FallbackChain(ModelSpec("m", "p"), ["torch"], {}, reprobe_after_s=0)


async def test_closed_chain_refuses_requests():
    chain = echo_chain({"a": EchoFaults()})
    chain.load()
    chain.close()
    with pytest.raises(EngineUnavailableError, match="not loaded"):
        await chain.generate(REQ)
    with pytest.raises(EngineUnavailableError):
        chain.active_engine


# -- regressions: switching never blocks status reads; config errors; out of memory; close drains -------------------


class GatedEcho(EchoEngine):
    """An echo engine whose load and inference wait for the test to open a gate (a slow engine, made explicit).

    ``loading`` / ``running`` are set once a load / an inference is under way, so the test waits for a condition,
    never for a duration.
    """

    def __init__(self, settings=None, *, load_gate=None, run_gate=None) -> None:
        super().__init__(settings)
        self.load_gate, self.run_gate = load_gate, run_gate
        self.loading, self.running = threading.Event(), threading.Event()

    def load(self, spec):
        self.loading.set()
        if self.load_gate is not None:
            assert self.load_gate.wait(60), "the test never opened the load gate"
        super().load(spec)

    def _generate_sync(self, batch):
        self.running.set()
        if self.run_gate is not None:
            assert self.run_gate.wait(60), "the test never opened the run gate"
        return super()._generate_sync(batch)


async def test_a_slow_fail_over_never_blocks_status_reads_and_waiting_requests_are_served():
    gate, made = threading.Event(), []

    def factory(name, settings):
        engine = GatedEcho(settings, load_gate=gate if name == "b" else None)
        made.append(engine)
        return engine

    rec = Recorder()
    chain = FallbackChain(ModelSpec("m", "unused"), ["a", "b"], {"a": {"faults": EchoFaults(fail_generate_times=1)}},
                          on_fallback=rec, clock=Clock(), engine_factory=factory)
    chain.load()
    first = asyncio.create_task(chain.generate(REQ))  # fails on a; the fail-over loads b, which waits at the gate
    try:
        await apoll(lambda: any(e.load_gate is gate and e.loading.is_set() for e in made), what="b's load to start")
        # What readiness and telemetry call on the event loop answer while b is still loading.
        status = await asyncio.wait_for(asyncio.to_thread(chain.status), 10)
        reasons = await asyncio.wait_for(asyncio.to_thread(lambda: chain.degraded_reasons), 10)
        assert status.engines["a"].state == "failed" and reasons
        second = asyncio.create_task(chain.generate([GenerationRequest("four five")]))  # waits for the switch
    finally:
        gate.set()
    (res,) = await first
    assert res.text == "one two three" and chain.engine_name == "b"
    assert (await second)[0].text == "four five"
    assert [(e.from_engine, e.reason) for e in rec.events] == [("a", "inference_error")]
    chain.close()


async def test_an_engine_config_error_makes_that_engine_unavailable_not_the_model():
    rec = Recorder()
    # dim 0 is refused by the echo engine with a non-retryable ModelLoadError: its settings, not the model.
    chain = FallbackChain(ModelSpec("m", "unused"), ["a", "b"], {"a": {"dim": 0}}, on_fallback=rec, clock=Clock(),
                          engine_factory=echo_factory)
    chain.load()
    assert chain.engine_name == "b"
    assert [(e.from_engine, e.reason) for e in rec.events] == [("a", "unavailable")]
    st = chain.status().engines["a"]
    assert st.state == "unavailable" and st.available is False and "dim must be >= 1" in st.reason
    chain.close()


def test_deepspeed_tensor_parallel_without_its_launcher_falls_back_to_the_next_engine(tmp_path):
    pytest.importorskip("deepspeed")
    rec = Recorder()
    chain = FallbackChain(ModelSpec("m", str(tmp_path)), ["deepspeed", "echo"],
                          {"deepspeed": {"tensor_parallel_size": 2}}, on_fallback=rec, clock=Clock())
    chain.load()
    assert chain.engine_name == "echo"
    assert [(e.from_engine, e.to_engine, e.reason) for e in rec.events] == [("deepspeed", "echo", "unavailable")]
    assert "deepspeed launcher" in chain.status().engines["deepspeed"].reason
    chain.close()


async def test_a_fatal_load_error_while_failing_over_is_that_engines_failure_not_the_request_answer(tmp_path):
    """The next engine cannot load the model at run time (here: torch, and a directory with no model in it): the
    request still gets its own error, later ones a clear "no engine can serve", and the model comes back."""
    clock, rec = Clock(), Recorder()
    faults = EchoFaults(fail_generate_times=1)
    chain = FallbackChain(ModelSpec("m", str(tmp_path)), ["echo", "torch"], {"echo": {"faults": faults}},
                          on_fallback=rec, reprobe_after_s=10.0, clock=clock)
    chain.load()
    with pytest.raises(InferenceError, match="injected generate failure"):
        await chain.generate(REQ)
    assert chain.engine_name is None and "holds no model" in chain.status().engines["torch"].reason
    assert [(e.from_engine, e.reason) for e in rec.events] == [("echo", "inference_error"), ("torch", "load_error")]
    faults.fail_load = True
    clock.t += 10  # both back-offs over: the request re-activates, and torch's fatal error is not raised at it
    with pytest.raises(EngineUnavailableError, match="no engine can serve model 'm'"):
        await chain.generate(REQ)
    faults.clear()
    clock.t += 20
    (res,) = await chain.generate(REQ)
    assert res.text == "one two three" and chain.engine_name == "echo"
    chain.close()


class OomEcho(EchoEngine):
    """Runs out of memory on a batch of more than ``limit`` requests, as a real allocator does."""

    limit = 2

    def _generate_sync(self, batch):
        if len(batch) > self.limit:
            import torch

            torch.empty(2**62, dtype=torch.uint8)  # the real allocator's real error
        return super()._generate_sync(batch)


async def test_out_of_memory_on_one_batch_goes_to_the_caller_and_the_model_stays():
    pytest.importorskip("torch")
    rec = Recorder()
    chain = FallbackChain(ModelSpec("m", "unused"), ["big", "small"], {}, on_fallback=rec, clock=Clock(),
                          engine_factory=lambda name, settings: OomEcho(settings))
    chain.load()
    with pytest.raises(InferenceError) as info:
        await chain.generate([GenerationRequest(f"r{i}") for i in range(3)])
    assert not info.value.retryable and isinstance(info.value.__cause__, RuntimeError)
    assert chain.engine_name == "big" and rec.events == [] and not chain.degraded
    (res,) = await chain.generate([GenerationRequest("still here")])
    assert res.text == "still here"
    chain.close()


def gated_chain(run_gate, **kw):
    def factory(name, settings):
        return GatedEcho(settings, run_gate=run_gate)

    chain = FallbackChain(ModelSpec("m", "unused"), ["a"], {}, clock=Clock(), engine_factory=factory, **kw)
    return chain, chain.load()


async def test_close_waits_for_running_and_queued_requests_then_closes_the_engine():
    gate = threading.Event()
    chain, engine = gated_chain(gate)
    running = asyncio.create_task(chain.generate([GenerationRequest("one")]))
    await apoll(engine.running.is_set, what="the first request to run")
    queued = asyncio.create_task(chain.generate([GenerationRequest("two")]))  # behind it on the engine's thread
    await asyncio.sleep(0)  # let it reach the engine
    closing = asyncio.create_task(asyncio.to_thread(chain.close))
    await apoll(lambda: chain._closed, what="close to start")
    with pytest.raises(EngineUnavailableError, match="not loaded"):
        await chain.generate(REQ)  # new requests are refused at once
    assert engine.loaded and not closing.done()
    gate.set()
    assert (await running)[0].text == "one" and (await queued)[0].text == "two"
    await closing
    assert not engine.loaded


async def test_close_on_the_event_loop_does_not_wait_and_still_closes_once_drained():
    gate = threading.Event()
    chain, engine = gated_chain(gate)
    running = asyncio.create_task(chain.generate([GenerationRequest("one")]))
    await apoll(engine.running.is_set, what="the request to run")
    chain.close()  # on the loop: returns at once, the engine closes when the request is done
    assert engine.loaded
    gate.set()
    assert (await running)[0].text == "one"
    await apoll(lambda: not engine.loaded, what="the engine to close")


async def test_close_gives_up_waiting_after_the_drain_timeout_and_queued_requests_get_503_errors():
    gate = threading.Event()
    chain, engine = gated_chain(gate, drain_timeout_s=0.0)
    running = asyncio.create_task(chain.generate([GenerationRequest("one")]))
    await apoll(engine.running.is_set, what="the first request to run")
    queued = asyncio.create_task(chain.generate([GenerationRequest("two")]))
    await asyncio.sleep(0)
    await asyncio.to_thread(chain.close)
    assert not engine.loaded
    with pytest.raises(EngineUnavailableError, match="unloaded before the request finished"):
        await queued  # an answer, not a CancelledError in a task nobody cancelled
    gate.set()
    await asyncio.gather(running, return_exceptions=True)


# -- regressions of issue 12: switches wait on futures, streams closed explicitly, the count moves with the switch --


class CountingEcho(GatedEcho):
    """Counts inference attempts, failed ones included (the echo engine's own ``calls`` counts successes)."""

    def __init__(self, settings=None, **kw) -> None:
        super().__init__(settings, **kw)
        self.attempts = 0

    def _generate_sync(self, batch):
        self.attempts += 1
        return super()._generate_sync(batch)


async def test_requests_waiting_for_a_fail_over_park_no_thread_of_the_default_pool():
    """Defect (a): every request that failed over parked a default-pool thread on the switch lock while the next
    engine loaded; with two such threads a two-thread pool had none left for anyone else's ``to_thread``."""
    loop = asyncio.get_running_loop()
    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="default-pool")
    loop.set_default_executor(pool)
    gate, made = threading.Event(), {}

    def factory(name, settings):
        made[name] = CountingEcho(settings, load_gate=gate if name == "b" else None)
        return made[name]

    failing = {"a": {"faults": EchoFaults(fail_generate_always=True)}}
    chain = FallbackChain(ModelSpec("m", "unused"), ["a", "b"], failing, clock=Clock(), engine_factory=factory)
    chain.load()
    requests = [asyncio.create_task(chain.generate([GenerationRequest(f"r{i}")])) for i in range(4)]
    try:
        await apoll(lambda: "b" in made and made["b"].loading.is_set(), what="b's load to start")
        await apoll(lambda: made["a"].attempts == 4, what="every request to fail on a")
        # The default pool still serves while b loads and four requests wait for it.
        assert await asyncio.wait_for(loop.run_in_executor(None, lambda: "free"), 10) == "free"
    finally:
        gate.set()
    results = await asyncio.gather(*requests)
    assert [r[0].text for r in results] == [f"r{i}" for i in range(4)] and chain.engine_name == "b"
    chain.close()
    pool.shutdown(wait=False)


class ClosableStreamEcho(EchoEngine):
    """An echo engine whose stream (a word per chunk) notes when it is closed."""

    def __init__(self, settings=None) -> None:
        super().__init__(settings)
        self.streams_closed = 0

    async def generate_stream(self, request):
        try:
            for word in request.prompt.split():
                yield StreamChunk(word + " ", None, 1, 1)
        finally:
            self.streams_closed += 1


async def test_leaving_a_chain_stream_closes_the_engines_stream_at_once():
    """Defect (c): the engine's stream was left suspended when the chain's stream was closed, so its clean-up (its
    cancellation of the work, for the real engines) waited for the garbage collector."""
    made = []

    def factory(name, settings):
        made.append(ClosableStreamEcho(settings))
        return made[-1]

    chain = FallbackChain(ModelSpec("m", "unused"), ["a"], clock=Clock(), engine_factory=factory)
    chain.load()
    stream = chain.generate_stream(GenerationRequest("one two three four"))
    assert (await stream.__anext__()).text == "one "
    await stream.aclose()
    assert made[-1].streams_closed == 1
    chain.close()


async def test_the_fallback_count_moves_with_the_switch_it_counts():
    """Defect (h): the count was bumped per event, without the lock, as the hooks were told; it now moves under the
    chain's lock together with the switch, so every hook (and every status read) sees the whole switch counted."""
    seen = []
    chain = echo_chain({"a": EchoFaults(fail_generate_always=True), "b": EchoFaults(fail_load=True),
                        "c": EchoFaults()}, rec=lambda ev: seen.append((ev.reason, chain.status().fallbacks)))
    chain.load()
    results = await asyncio.gather(*(chain.generate([GenerationRequest(f"r{i}")]) for i in range(6)))
    assert [r[0].text for r in results] == [f"r{i}" for i in range(6)] and chain.engine_name == "c"
    assert seen == [("inference_error", 2), ("load_error", 2)]
    assert chain.status().fallbacks == 2
    chain.close()
