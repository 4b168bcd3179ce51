"""vLLM with ``pipeline_parallel_size=2`` on two local CPU ranks gives the greedy output of one rank.

Each rank holds one of the tiny Llama's two decoder layers and passes its hidden states to the next over gloo.
vLLM 0.32's CPU worker never allocates the buffer a later stage receives them in when it runs eagerly with an
explicit KV-cache size (see ``adapters.vllm_runtime._pipeline_cpu_worker``); without the adapter's worker the
second stage fails its first step and the engine dies, so this test also guards that fix.
"""

from __future__ import annotations

import asyncio
import os

import pytest

pytest.importorskip("torch")
pytest.importorskip("vllm")

from adapters.base import GenerationRequest, GenerationResult, ModelLoadError, ModelSpec, SamplingParams  # noqa: E402
from adapters.vllm_engine import VllmEngine  # noqa: E402

PROMPTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog, and then it runs away",
    "Tell me a story about a small robot",
    "Numbers one two three four five",
    "What is the weather like?",
]
NEW_TOKENS = 10


async def _token_ids(engine: VllmEngine) -> list[list[int]]:
    """The generated token ids themselves (the adapter returns text): the same greedy requests, on the engine's loop."""
    import vllm

    async def one(i: int, prompt: str) -> list[int]:
        params = vllm.SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
        final = None
        async for out in engine._llm.generate(prompt, params, f"ids-{i}"):
            final = out
        return list(final.outputs[0].token_ids)

    async def every() -> list[list[int]]:
        return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(PROMPTS))))

    return await asyncio.wrap_future(engine._submit(every()))


async def _generate(model_dir, pp: int) -> tuple[list[GenerationResult], list[list[int]], dict]:
    engine = VllmEngine({"kv_cache_memory_bytes": 64 * 2**20, "enforce_eager": True, "pipeline_parallel_size": pp})
    await asyncio.to_thread(engine.load, ModelSpec("tiny-llama", str(model_dir), max_model_len=512,
                                                   options={"ignore_eos": True}))
    try:
        status = engine.status()
        caps = engine.capabilities
        batch = [GenerationRequest(p, SamplingParams(max_new_tokens=NEW_TOKENS)) for p in PROMPTS]
        got = await engine.generate(batch)
        ids = await _token_ids(engine)
    finally:
        await asyncio.to_thread(engine.close)
    return got, ids, {"status": status, "pipeline_parallel": caps.pipeline_parallel}


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_two_pipeline_stages_give_the_single_stage_output(tiny_llama_dir):
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("two CPU ranks need two cores")
    want, want_ids, one = await _generate(tiny_llama_dir, 1)
    got, got_ids, two = await _generate(tiny_llama_dir, 2)

    assert one["status"]["pipeline_parallel_size"] == 1 and not one["pipeline_parallel"]
    assert two["status"]["pipeline_parallel_size"] == 2 and two["pipeline_parallel"]
    for w, g in zip(want, got, strict=True):
        assert w.error is None and g.error is None
        assert g.completion_tokens == w.completion_tokens == NEW_TOKENS
        assert g.prompt_tokens == w.prompt_tokens
        assert g.finish_reason == w.finish_reason == "length"
        assert g.text == w.text
    assert [len(i) for i in got_ids] == [NEW_TOKENS] * len(PROMPTS)
    assert got_ids == want_ids


def test_more_ranks_than_cores_is_refused_before_vllm_starts(tiny_llama_dir):
    cores = len(os.sched_getaffinity(0))
    engine = VllmEngine({"kv_cache_memory_bytes": 64 * 2**20, "pipeline_parallel_size": cores + 1})
    with pytest.raises(ModelLoadError) as info:
        engine.load(ModelSpec("tiny-llama", str(tiny_llama_dir)))
    message = str(info.value)
    assert "tensor_parallel_size=1 x pipeline_parallel_size=" in message and f"only {cores} CPU core" in message
    assert info.value.retryable is False and not engine.loaded
