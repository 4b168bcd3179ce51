"""vLLM with ``tensor_parallel_size=2`` on two local CPU ranks gives the single-rank output.

vLLM starts one worker process per rank; the engine pins each rank's OpenMP threads to its own cores
(``VLLM_CPU_OMP_THREADS_BIND``) only while it starts. The single-rank reference is the torch engine, which the
module ``test_vllm_engine`` shows vLLM with one rank agrees with.
"""

from __future__ import annotations

import asyncio
import os

import pytest

pytest.importorskip("torch")
pytest.importorskip("vllm")

from adapters.base import GenerationRequest, ModelSpec, SamplingParams  # noqa: E402
from adapters.torch_engine import TorchEngine  # noqa: E402
from adapters.vllm_engine import VllmEngine  # noqa: E402

PROMPTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog, and then it runs away",
    "Tell me a story about a small robot",
    "Numbers one two three four five",
    "What is the weather like?",
]


@pytest.mark.slow
@pytest.mark.timeout(360)
async def test_two_cpu_ranks_give_the_single_rank_output(tiny_llama_dir):
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("two CPU ranks need two cores")
    batch = [GenerationRequest(p, SamplingParams(max_new_tokens=10)) for p in PROMPTS]
    ref = TorchEngine({})
    ref.load(ModelSpec("tiny-llama", str(tiny_llama_dir), device="cpu"))
    want = ref._generate_sync(batch)
    ref.close()

    binding_before = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    engine = VllmEngine({"kv_cache_memory_bytes": 64 * 2**20, "enforce_eager": True, "tensor_parallel_size": 2})
    await asyncio.to_thread(engine.load, ModelSpec("tiny-llama", str(tiny_llama_dir), max_model_len=512,
                                                   options={"ignore_eos": True}))
    try:
        assert os.environ.get("VLLM_CPU_OMP_THREADS_BIND") == binding_before  # scoped to the start
        status = engine.status()
        assert status["tensor_parallel_size"] == 2 and engine.capabilities.tensor_parallel
        got = await engine.generate(batch)
    finally:
        await asyncio.to_thread(engine.close)
    compared = 0
    for w, g in zip(want, got):
        assert g.error is None and g.completion_tokens == 10 and g.prompt_tokens == w.prompt_tokens
        if w.finish_reason == "length":
            assert g.text == w.text
            compared += 1
    assert compared >= 2
