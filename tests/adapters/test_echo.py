"""The echo engine: our own engine with no ML, used by the server benchmark and for fault injection."""

from __future__ import annotations

import math
import time

import pytest

from adapters.base import (
    EngineUnavailableError,
    GenerationRequest,
    InferenceError,
    InvalidRequestError,
    ModelLoadError,
    ModelSpec,
    SamplingParams,
)
from adapters.echo import EchoEngine, EchoFaults, hash_vector

SPEC = ModelSpec("echo-model", "unused", task="generate")


def loaded(settings=None, spec=SPEC) -> EchoEngine:
    engine = EchoEngine(settings or {})
    engine.load(spec)
    return engine


async def test_generate_echoes_the_last_words_with_whitespace_token_counts():
    engine = loaded()
    short, long_, stop = await engine.generate([
        GenerationRequest("hello there world", SamplingParams(max_new_tokens=8)),
        GenerationRequest("one two three four five", SamplingParams(max_new_tokens=2)),
        GenerationRequest("a b STOP c d", SamplingParams(max_new_tokens=10, stop=("STOP",))),
    ])
    assert (short.text, short.prompt_tokens, short.completion_tokens, short.finish_reason) == (
        "hello there world", 3, 3, "stop")
    assert (long_.text, long_.prompt_tokens, long_.completion_tokens, long_.finish_reason) == (
        "four five", 5, 2, "length")
    assert (stop.text, stop.completion_tokens, stop.finish_reason) == ("a b ", 2, "stop")
    engine.close()


async def test_bad_request_gets_its_own_error_and_neighbours_are_served():
    engine = loaded()
    bad, good = await engine.generate([
        GenerationRequest("x", SamplingParams(max_new_tokens=0)),
        GenerationRequest("y z", SamplingParams(max_new_tokens=4)),
    ])
    assert isinstance(bad.error, InvalidRequestError) and not bad.error.retryable
    assert good.error is None and good.text == "y z"


async def test_embed_is_deterministic_and_unit_length():
    engine = loaded({"dim": 8})
    a1, b, a2 = await engine.embed(["alpha beta", "gamma", "alpha beta"])
    assert a1.vector == a2.vector != b.vector
    assert len(a1.vector) == 8 and math.isclose(sum(v * v for v in a1.vector), 1.0, rel_tol=1e-9)
    assert a1.prompt_tokens == 2
    assert len(hash_vector("x", 20)) == 20


async def test_stream_yields_a_chunk_per_word_that_joins_to_the_completion():
    engine = loaded()
    req = GenerationRequest("the quick brown fox", SamplingParams(max_new_tokens=3))
    chunks = [c async for c in engine.generate_stream(req)]
    assert [c.text for c in chunks] == ["quick ", "brown ", "fox"]
    assert [c.finish_reason for c in chunks] == [None, None, "length"]
    assert chunks[-1].completion_tokens == 3 and chunks[-1].prompt_tokens == 4


async def test_fault_injection_fails_the_set_number_of_calls_then_recovers():
    faults = EchoFaults(fail_generate_times=2)
    engine = loaded({"faults": faults})
    req = [GenerationRequest("hi")]
    for _ in range(2):
        with pytest.raises(InferenceError) as info:
            await engine.generate(req)
        assert info.value.retryable and info.value.engine == "echo"
    (ok,) = await engine.generate(req)
    assert ok.text == "hi" and engine.calls == 1


def test_fault_injection_from_plain_settings_and_model_options():
    with pytest.raises(ModelLoadError, match="injected load failure"):
        loaded({"fail_load": True})
    with pytest.raises(ModelLoadError):
        loaded(spec=ModelSpec("m", "p", options={"fail_load": True}))
    assert not EchoEngine.available({"unavailable": "switched off for the drill"})
    assert EchoEngine.available({"unavailable": "switched off"}).reason == "switched off"
    with pytest.raises(EngineUnavailableError):
        loaded({"unavailable": "gone"})
    engine = loaded({"fail_generate_times": 1})
    with pytest.raises(InferenceError):
        engine._generate_sync([GenerationRequest("a")])
    assert engine._generate_sync([GenerationRequest("a")])[0].text == "a"


def test_shared_faults_clear_across_instances():
    faults = EchoFaults(fail_load=True)
    with pytest.raises(ModelLoadError):
        loaded({"faults": faults})
    faults.clear()
    assert loaded({"faults": faults}).loaded


def test_inject_delay_sleeps_before_each_inference_and_changes_at_runtime():
    engine = loaded(spec=ModelSpec("m", "p", options={"inject_delay_s": 0.05}))
    start = time.monotonic()
    engine._generate_sync([GenerationRequest("a")])
    assert time.monotonic() - start >= 0.05
    assert engine.status()["inject_delay_s"] == 0.05
    engine.reconfigure(inject_delay_s=0)
    assert engine.status()["inject_delay_s"] == 0.0


def test_not_loaded_is_an_engine_error():
    # Unavailable (a 503 at the server), like a call that close() dropped: it is not the engine failing.
    with pytest.raises(EngineUnavailableError, match="no model loaded"):
        EchoEngine()._generate_sync([GenerationRequest("a")])
