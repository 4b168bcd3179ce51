"""The engine adapter contract, run over every implementation: echo, torch, ONNX Runtime, DeepSpeed and vLLM.

Each engine is the real one on the tiny Llama (vLLM on its CPU build, DeepSpeed on its CPU accelerator, ORT on its
CPU provider), loaded once per engine for the module. What is checked is what the rest of the project relies on
whichever engine serves: the interface's shape, one result per request in order with token counts, a bad request
failing alone, streams that join to the completion and can be left early, stop sequences, and "unavailable" (never
an engine failure) from an engine that has nothing loaded.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping

import pytest

from adapters import registry
from adapters.base import (
    Availability,
    Capabilities,
    EngineError,
    EngineUnavailableError,
    GenerationRequest,
    InvalidRequestError,
    ModelSpec,
    SamplingParams,
)

pytestmark = pytest.mark.timeout(600)

ENGINES = ["echo", "torch", "onnxruntime", "deepspeed", "vllm"]
NEEDS = {"torch": ("torch", "transformers"), "onnxruntime": ("onnxruntime", "onnxscript", "torch"),
         "deepspeed": ("deepspeed", "torch"), "vllm": ("vllm", "torch")}
SETTINGS: Mapping[str, dict] = {
    "echo": {},
    "torch": {},
    "onnxruntime": {"providers": ["CPUExecutionProvider"]},
    "deepspeed": {"tensor_parallel_size": 1, "replace_with_kernel_inject": False, "dtype": "float32"},
    "vllm": {"kv_cache_memory_bytes": 64 * 2**20, "enforce_eager": True, "enable_prefix_caching": True},
}
PROMPTS = ["Hello world", "The quick brown fox jumps over the lazy dog", "Tell me a story about a small robot"]


def _needs(name: str) -> None:
    for module in NEEDS.get(name, ()):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed")


def _spec(name: str, path) -> ModelSpec:
    if name == "vllm":
        # ignore_eos: the random tiny model often picks EOS at once; generating max_new_tokens keeps texts long.
        return ModelSpec("tiny-llama", str(path), max_model_len=512, options={"ignore_eos": True})
    return ModelSpec("tiny-llama", str(path), device="cpu")


@pytest.fixture(scope="module", params=ENGINES)
def engine_name(request) -> str:
    _needs(request.param)
    return request.param


@pytest.fixture(scope="module")
def engine(engine_name, tiny_llama_dir):
    eng = registry.create_engine(engine_name, SETTINGS[engine_name])
    eng.load(_spec(engine_name, tiny_llama_dir))
    yield eng
    eng.close()
    eng.close()  # closing twice is safe


def _greedy(n: int = 6, prompts=PROMPTS) -> list[GenerationRequest]:
    return [GenerationRequest(p, SamplingParams(max_new_tokens=n)) for p in prompts]


# ---------------------------------------------------------------------------------------------- shape
def test_the_interface_shape(engine_name):
    cls = registry.get_engine_class(engine_name)
    assert cls.name == engine_name
    av = cls.available(SETTINGS[engine_name])
    assert isinstance(av, Availability) and av.ok, av.reason
    assert isinstance(cls.capabilities, Capabilities) and cls.capabilities.max_batch_size >= 1


async def test_an_engine_with_nothing_loaded_is_unavailable_never_an_engine_failure(engine_name):
    eng = registry.create_engine(engine_name, SETTINGS[engine_name])
    assert not eng.loaded
    assert eng.status()["engine"] == engine_name and eng.status()["model"] is None
    with pytest.raises(EngineUnavailableError):
        await eng.generate(_greedy(2, PROMPTS[:1]))
    with pytest.raises(EngineUnavailableError):
        [c async for c in eng.generate_stream(_greedy(2, PROMPTS[:1])[0])]
    eng.close()
    eng.close()


def test_status_and_stats(engine, engine_name):
    status = engine.status()
    assert status["engine"] == engine_name and status["model"] == "tiny-llama"
    assert engine.loaded and isinstance(engine.capabilities, Capabilities)
    assert all(isinstance(k, str) and isinstance(v, float) for k, v in engine.stats().items())


# ---------------------------------------------------------------------------------------------- generate
async def test_one_result_per_request_in_order_with_token_counts(engine):
    results = await engine.generate(_greedy(4))
    assert len(results) == len(PROMPTS)
    for res in results:
        assert res.error is None, res.error
        assert res.prompt_tokens > 0 and 0 < res.completion_tokens <= 4
        assert res.finish_reason in ("stop", "length")
        assert res.finish_reason == "stop" or res.completion_tokens == 4
    # In order: each result is the one its request gets alone.
    for prompt, res in zip(PROMPTS, results):
        (alone,) = await engine.generate(_greedy(4, [prompt]))
        assert (alone.text, alone.completion_tokens) == (res.text, res.completion_tokens)


async def test_a_bad_request_fails_alone(engine):
    good, bad = _greedy(3, PROMPTS[:2])
    bad = GenerationRequest(bad.prompt, SamplingParams(max_new_tokens=0))
    ok, failed = await engine.generate([good, bad])
    assert ok.error is None and ok.completion_tokens > 0
    assert isinstance(failed.error, InvalidRequestError) and isinstance(failed.error, EngineError)
    assert not failed.error.retryable and failed.finish_reason == "error"


async def test_stop_sequences_trim_the_text_and_finish_with_stop(engine):
    (full,) = await engine.generate(_greedy(8, PROMPTS[1:2]))
    text = full.text
    stop = next((text[i:i + 2] for i in range(1, len(text) - 1) if text[i:i + 2].strip()), None)
    if stop is None:
        pytest.skip(f"the completion {text!r} is too short to pick a stop sequence from")
    req = GenerationRequest(PROMPTS[1], SamplingParams(max_new_tokens=8, stop=(stop,)))
    (res,) = await engine.generate([req])
    assert res.finish_reason == "stop" and stop not in res.text
    assert res.text == text[: text.index(stop)]


# ---------------------------------------------------------------------------------------------- streaming
async def test_a_stream_joins_to_the_completion_and_ends_with_the_finish_reason(engine):
    (req,) = _greedy(6, PROMPTS[2:])
    (whole,) = await engine.generate([req])
    chunks = [c async for c in engine.generate_stream(req)]
    assert chunks and "".join(c.text for c in chunks) == whole.text
    assert [c.finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    last = chunks[-1]
    assert (last.finish_reason, last.prompt_tokens, last.completion_tokens) == \
        (whole.finish_reason, whole.prompt_tokens, whole.completion_tokens)


async def test_leaving_a_stream_early_leaves_the_engine_serving(engine):
    req = GenerationRequest(PROMPTS[0], SamplingParams(max_new_tokens=32))
    stream = engine.generate_stream(req)
    first = await stream.__anext__()
    assert first.prompt_tokens > 0
    await stream.aclose()
    (res,) = await engine.generate(_greedy(3, PROMPTS[:1]))
    assert res.error is None and res.completion_tokens > 0


# ---------------------------------------------------------------------------------------------- last: close
async def test_after_close_requests_are_unavailable(engine):
    """Runs last for each engine (file order): the module's engine is closed here; its teardown closes it again."""
    engine.close()
    assert not engine.loaded
    with pytest.raises(EngineUnavailableError):
        await engine.generate(_greedy(2, PROMPTS[:1]))
