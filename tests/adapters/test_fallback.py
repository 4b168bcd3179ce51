"""The fallback chain over real engines: the echo engine's fault injection and the torch engine on a tiny model.

No engine library is mocked: "vLLM absent" is an engine whose ``available()`` says no (the echo engine with its
``unavailable`` fault), and load/inference failures are the echo engine's injected faults.
"""

from __future__ import annotations

import asyncio

import pytest

from adapters import registry
from adapters.base import (
    EngineUnavailableError,
    GenerationRequest,
    InferenceError,
    InvalidRequestError,
    ModelLoadError,
    ModelSpec,
    SamplingParams,
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
    assert status["active_engine"] == "torch" and status["degraded"]
    assert status["engines"]["echo"]["available"] is False
    assert status["engines"]["echo"]["reason"] == "vllm is not installed here"
    assert status["engines"]["torch"]["state"] == "active"
    assert status["fallbacks"] == 1

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
    assert chain.status()["engines"]["echo"]["state"] == "failed"
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
    assert chain.status()["engines"]["primary"]["retry_in_s"] == 10.0
    clock.t += 10
    assert await chain.reprobe() is False
    assert chain.status()["engines"]["primary"]["retry_in_s"] == 20.0
    assert chain.status()["engines"]["primary"]["failures"] == 2
    clock.t += 19
    assert not chain.reprobe_due()
    primary.clear()
    clock.t += 1
    assert await chain.reprobe() is True
    assert chain.engine_name == "primary" and chain.status()["engines"]["primary"]["failures"] == 0
    assert len(rec.events) == 1  # failed re-probes do not count as new fallbacks
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
    assert chain.status()["engines"]["torch"]["state"] == "disabled"
    chain.close()


async def test_runtime_changes_reach_the_next_engine_too():
    chain = echo_chain({"a": EchoFaults(fail_generate_times=1), "b": EchoFaults()})
    chain.load()
    chain.reconfigure(inject_delay_s=0.01)
    assert chain.status()["engine_status"]["inject_delay_s"] == 0.01
    await chain.generate(REQ)
    assert chain.engine_name == "b" and chain.status()["engine_status"]["inject_delay_s"] == 0.01
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
