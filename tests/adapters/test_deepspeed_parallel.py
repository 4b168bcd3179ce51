"""adapters.parallel: the launch-environment and placement questions DeepSpeed and vLLM ask before they start."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import adapters.parallel as parallel
from adapters.parallel import (
    DistEnv,
    ParallelConfigError,
    check_autotp_env,
    cpu_thread_binding,
    deepspeed_include,
    deepspeed_rank_device,
    dist_env,
    free_port,
    resolve_tp_size,
    visible_gpu_count,
)


def test_public_surface():
    assert sorted(parallel.__all__) == [
        "DistEnv", "ParallelConfigError", "check_autotp_env", "cpu_thread_binding", "deepspeed_include",
        "deepspeed_rank_device", "device_indices", "dist_env", "free_port", "resolve_tp_size", "visible_devices_env",
        "visible_gpu_count",
    ]
    assert issubclass(ParallelConfigError, ValueError)


def test_dist_env_defaults_to_one_rank():
    env = dist_env({})
    assert env == DistEnv()
    assert not env.launched


def test_dist_env_reads_the_deepspeed_launcher_variables():
    env = dist_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_SIZE": "2",
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29512"})
    assert env == DistEnv(1, 2, 1, 2, "127.0.0.1", 29512)
    assert env.launched


def test_dist_env_names_a_bad_variable():
    with pytest.raises(ParallelConfigError, match="WORLD_SIZE='two'"):
        dist_env({"WORLD_SIZE": "two"})


def test_autotp_single_rank_needs_nothing():
    check_autotp_env(1, DistEnv(), on_cpu=True)


def test_autotp_refuses_a_process_that_was_not_launched_as_ranks():
    with pytest.raises(ParallelConfigError, match="deepspeed --num_gpus 2"):
        check_autotp_env(2, DistEnv(), on_cpu=True)


def test_autotp_on_cpu_refuses_torchrun_style_ranks_without_local_size():
    # torchrun sets RANK/WORLD_SIZE but not LOCAL_SIZE: DeepSpeed's CPU all-reduce would segfault.
    env = dist_env({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    with pytest.raises(ParallelConfigError, match="LOCAL_SIZE"):
        check_autotp_env(2, env, on_cpu=True)
    check_autotp_env(2, env, on_cpu=False)  # GPUs use NCCL, which does not need it
    check_autotp_env(2, DistEnv(0, 2, 0, 2), on_cpu=True)


def test_autotp_rejects_nonsense_sizes():
    with pytest.raises(ParallelConfigError):
        check_autotp_env(0, DistEnv(), on_cpu=True)


def test_tp_size_defaults_to_visible_gpus_and_at_least_one():
    assert resolve_tp_size(None, gpus=0) == 1
    assert resolve_tp_size(None, gpus=4) == 4
    assert resolve_tp_size(2, gpus=0) == 2  # CPU ranks
    with pytest.raises(ParallelConfigError, match="only 2 GPU"):
        resolve_tp_size(4, gpus=2)
    with pytest.raises(ParallelConfigError):
        resolve_tp_size(0, gpus=0)


def test_cpu_thread_binding_examples():
    assert cpu_thread_binding(2, [0, 1]) == "0|1"
    assert cpu_thread_binding(2, range(8)) == "0-3|4-7"
    assert cpu_thread_binding(1, [0, 1, 2, 5]) == "0-2,5"
    assert cpu_thread_binding(3, range(7)) == "0-2|3-4|5-6"
    with pytest.raises(ParallelConfigError, match="at least 3 cores"):
        cpu_thread_binding(3, [0, 1])


def _expand(group: str) -> list[int]:
    out = []
    for part in group.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


@settings(max_examples=150, deadline=None)
@given(cpus=st.sets(st.integers(0, 63), min_size=1, max_size=64), data=st.data())
def test_cpu_thread_binding_partitions_the_cores(cpus, data):
    ranks = data.draw(st.integers(1, len(cpus)))
    groups = [_expand(g) for g in cpu_thread_binding(ranks, sorted(cpus)).split("|")]
    assert len(groups) == ranks
    assert sorted(c for g in groups for c in g) == sorted(cpus)  # every core once, none invented
    sizes = [len(g) for g in groups]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_visible_gpu_count_honours_an_empty_cuda_visible_devices():
    assert visible_gpu_count({"CUDA_VISIBLE_DEVICES": ""}) == 0
    assert visible_gpu_count({"CUDA_VISIBLE_DEVICES": "-1"}) == 0
    assert visible_gpu_count() >= 0


def test_deepspeed_ranks_are_held_to_their_planned_gpus():
    """Rank i of a replica the planner put on cuda:2 + cuda:3 is on cuda:(2+i) only when the launcher made those
    the visible GPUs in that order; otherwise DeepSpeed would put it on visible GPU i, so the load is refused."""
    devices = ("cuda:2", "cuda:3")
    assert deepspeed_include(devices) == "localhost:2,3"
    launched = {"CUDA_VISIBLE_DEVICES": "2,3"}
    assert deepspeed_rank_device(devices, DistEnv(rank=1, world_size=2, local_rank=1), launched) == "cuda:3"
    assert deepspeed_rank_device(("cuda:0", "cuda:1"), DistEnv(world_size=2), {}) == "cuda:0"  # all visible
    for environ in ({}, {"CUDA_VISIBLE_DEVICES": "3,2"}, {"CUDA_VISIBLE_DEVICES": "0,1"}):
        with pytest.raises(ParallelConfigError, match="deepspeed --include localhost:2,3"):
            deepspeed_rank_device(devices, DistEnv(world_size=2), environ)
    with pytest.raises(ParallelConfigError, match=r"2 device\(s\) \(cuda:2, cuda:3\) for 4 DeepSpeed rank"):
        deepspeed_rank_device(devices, DistEnv(world_size=4), launched)


def test_the_deepspeed_engine_takes_its_planned_gpu():
    from adapters.base import ModelSpec
    from adapters.deepspeed_engine import DeepSpeedEngine

    one = ModelSpec("m", "/nowhere", options={"devices": ("cuda:5",)})
    assert DeepSpeedEngine._planned_device(one, 1, on_cpu=False) == 5
    assert DeepSpeedEngine._planned_device(one, 1, on_cpu=True) is None  # nothing planned on the CPU
    assert DeepSpeedEngine._planned_device(ModelSpec("m", "/nowhere"), 1, on_cpu=False) is None
    with pytest.raises(ParallelConfigError, match="for one DeepSpeed rank"):
        DeepSpeedEngine._planned_device(ModelSpec("m", "/nowhere", options={"devices": ("cuda:0", "cuda:1")}), 1,
                                        on_cpu=False)


def test_free_port_is_bindable():
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_engine_modules_import_no_engine():
    code = (
        "import sys, adapters.parallel, adapters.onnx_engine, adapters.deepspeed_engine, adapters.vllm_engine;"
        "bad = [m for m in ('torch', 'vllm', 'deepspeed', 'onnxruntime', 'onnx', 'transformers') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
