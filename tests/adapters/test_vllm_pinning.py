"""vLLM on the GPUs the planner gave a replica (``spec.options["devices"]``): what the engine hands vLLM (pure),
and, on this machine's CPU, a real two-rank start whose rank processes, and only they, carry the devices'
``CUDA_VISIBLE_DEVICES`` while the serving process's environment is left as it was. The ranks are asked through
vLLM's own ``collective_rpc`` (their process titles overwrite what ``/proc/<pid>/environ`` would show). That the
ranks then run on those GPUs is the ``gpu`` test (scripts/gpu-check.sh)."""

from __future__ import annotations

import asyncio
import os

import pytest

from adapters.parallel import ParallelConfigError, device_indices, visible_devices_env
from adapters.vllm_runtime import DEVICE_ENV_KEY, PINNED_EXECUTORS

PINNED = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "2,3"}


def test_the_planned_devices_become_the_environment_of_the_engines_ranks():
    assert visible_devices_env(["cuda:2", "cuda:3"]) == PINNED
    assert visible_devices_env(("cuda:5",)) == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "5"}
    assert device_indices(["cuda:3", "cuda:1"]) == [3, 1]  # rank order is kept: rank 0 on GPU 3
    for bad in (["cpu"], ["cuda"], ["cuda:1", "cuda:1"], ["gpu:0"]):
        with pytest.raises(ParallelConfigError):
            visible_devices_env(bad)


def test_vllm_is_handed_a_pinned_executor_and_the_devices_environment():
    pytest.importorskip("vllm")
    from adapters.vllm_engine import VllmEngine

    assert VllmEngine.pinning(("cuda:2", "cuda:3"), 2) == {
        "distributed_executor_backend": PINNED_EXECUTORS["mp"], "additional_config": {DEVICE_ENV_KEY: PINNED}}
    assert VllmEngine.pinning(("cuda:4",), 1)["distributed_executor_backend"] == PINNED_EXECUTORS["uni"]
    with pytest.raises(ParallelConfigError, match=r"2 device\(s\) \(cuda:2, cuda:3\) for 4 rank"):
        VllmEngine.pinning(("cuda:2", "cuda:3"), 4)


def test_the_pinned_executors_are_vllms_own_found_by_name():
    pytest.importorskip("vllm")
    from vllm.utils.import_utils import resolve_obj_by_qualname
    from vllm.v1.executor.multiproc_executor import MultiprocExecutor
    from vllm.v1.executor.uniproc_executor import UniProcExecutor

    assert issubclass(resolve_obj_by_qualname(PINNED_EXECUTORS["mp"]), MultiprocExecutor)
    assert issubclass(resolve_obj_by_qualname(PINNED_EXECUTORS["uni"]), UniProcExecutor)


def test_a_device_list_that_does_not_match_the_ranks_is_refused_before_vllm_starts(tiny_llama_dir):
    pytest.importorskip("vllm")
    from adapters.base import ModelLoadError, ModelSpec
    from adapters.vllm_engine import VllmEngine

    engine = VllmEngine({"kv_cache_memory_bytes": 64 * 2**20})
    spec = ModelSpec("tiny-llama", str(tiny_llama_dir), options={"devices": ("cuda:0", "cuda:1")})
    with pytest.raises(ModelLoadError, match=r"2 device\(s\) \(cuda:0, cuda:1\) for 1 rank") as caught:
        engine.load(spec)
    assert not caught.value.retryable and engine._llm is None


def _rank_view(worker) -> tuple[int, str | None, str | None]:
    return os.getpid(), os.environ.get("CUDA_VISIBLE_DEVICES"), os.environ.get("CUDA_DEVICE_ORDER")


@pytest.mark.slow
@pytest.mark.timeout(360)
async def test_two_ranks_get_the_planned_devices_in_their_own_processes_only(tiny_llama_dir, monkeypatch):
    pytest.importorskip("vllm")
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("two CPU ranks need two cores")
    from adapters.base import GenerationRequest, ModelSpec, SamplingParams
    from adapters.vllm_engine import VllmEngine

    # Only so that collective_rpc may carry a function to the ranks (vLLM pickles it); the engine needs none.
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    keys = ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER")
    before = {k: os.environ.get(k) for k in keys}
    engine = VllmEngine({"kv_cache_memory_bytes": 64 * 2**20, "enforce_eager": True})
    spec = ModelSpec("tiny-llama", str(tiny_llama_dir), tensor_parallel_size=2, max_model_len=512,
                     options={"devices": ("cuda:3", "cuda:1")})
    await asyncio.to_thread(engine.load, spec)
    try:
        # The serving process never had the devices' environment (vLLM sets variables of its own in it).
        assert {k: os.environ.get(k) for k in keys} == before
        assert engine.status()["devices"] == ["cuda:3", "cuda:1"]
        ranks = await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(
            engine._llm.collective_rpc(lambda worker: _rank_view(worker)), engine._loop))
        assert len(ranks) == 2 and len({pid for pid, _, _ in ranks} | {os.getpid()}) == 3
        assert all(view[1:] == ("3,1", "PCI_BUS_ID") for view in ranks), ranks
        (out,) = await engine.generate([GenerationRequest("Hello world", SamplingParams(max_new_tokens=4))])
        assert out.error is None and out.completion_tokens > 0
    finally:
        await asyncio.to_thread(engine.close)


def _rank_gpu(worker) -> tuple[str | None, str]:
    import torch

    return os.environ.get("CUDA_VISIBLE_DEVICES"), str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)


@pytest.mark.gpu
@pytest.mark.timeout(600)
async def test_on_a_gpu_the_rank_runs_on_the_planned_gpu(tiny_llama_dir, monkeypatch):
    """The last GPU NVML lists (the one an unpinned engine would not take): the rank's CUDA device is that GPU,
    by UUID. Needs vLLM's CUDA build (the CPU build, which the test environment installs, is skipped)."""
    pytest.importorskip("vllm")
    import pynvml
    from vllm.platforms import current_platform

    if not current_platform.is_cuda():
        pytest.skip("vLLM's CPU build is installed; pinning on a GPU needs vLLM's CUDA build")
    from adapters.base import GenerationRequest, ModelSpec, SamplingParams
    from adapters.vllm_engine import VllmEngine

    pynvml.nvmlInit()
    try:
        last = pynvml.nvmlDeviceGetCount() - 1
        uuid = pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(last))
    finally:
        pynvml.nvmlShutdown()
    uuid = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    engine = VllmEngine({"kv_cache_memory_bytes": 64 * 2**20, "enforce_eager": True, "gpu_memory_utilization": 0.2})
    await asyncio.to_thread(engine.load, ModelSpec("tiny-llama", str(tiny_llama_dir), max_model_len=512,
                                                   options={"devices": (f"cuda:{last}",)}))
    try:
        ranks = await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(
            engine._llm.collective_rpc(lambda worker: _rank_gpu(worker)), engine._loop))
        assert [r[0] for r in ranks] == [str(last)]
        assert ranks[0][1] in uuid, (ranks, uuid)  # NVML writes "GPU-<uuid>", torch the UUID alone
        (out,) = await engine.generate([GenerationRequest("Hello world", SamplingParams(max_new_tokens=4))])
        assert out.error is None and out.completion_tokens > 0
    finally:
        await asyncio.to_thread(engine.close)
