"""Placement helpers for the engines that split a model across devices or ranks (DeepSpeed AutoTP, vLLM).

Nothing here is a home-made cluster: the engines place the shards; these functions only answer the questions
the adapters ask before handing settings over (how many GPUs are visible, which rank am I, may AutoTP run in
this process, how to pin each CPU rank's OpenMP threads, which port is free). Everything is cheap and imports
no engine; torch is imported only by ``visible_gpu_count`` and only when ``CUDA_VISIBLE_DEVICES`` does not
already answer.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "DistEnv",
    "ParallelConfigError",
    "check_autotp_env",
    "cpu_thread_binding",
    "deepspeed_include",
    "deepspeed_rank_device",
    "device_indices",
    "dist_env",
    "free_port",
    "resolve_tp_size",
    "visible_devices_env",
    "visible_gpu_count",
]


class ParallelConfigError(ValueError):
    """A tensor/pipeline parallel setting cannot work in this process (wrong launcher, too few ranks or GPUs)."""


@dataclass(frozen=True, slots=True)
class DistEnv:
    """The distributed launch environment of this process, as the launchers (deepspeed, torchrun) describe it."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_size: int | None = None
    """``LOCAL_SIZE``: set by the ``deepspeed`` launcher, not by torchrun."""
    master_addr: str | None = None
    master_port: int | None = None

    @property
    def launched(self) -> bool:
        """True when a launcher started this process as one rank of several."""
        return self.world_size > 1


def _int(env: Mapping[str, str], key: str, default: int | None) -> int | None:
    raw = env.get(key)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ParallelConfigError(f"environment variable {key}={raw!r} is not an integer") from exc


def dist_env(env: Mapping[str, str] | None = None) -> DistEnv:
    """Read RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_SIZE / MASTER_ADDR / MASTER_PORT (defaults: one rank)."""
    env = os.environ if env is None else env
    return DistEnv(
        rank=_int(env, "RANK", 0) or 0,
        world_size=_int(env, "WORLD_SIZE", 1) or 1,
        local_rank=_int(env, "LOCAL_RANK", 0) or 0,
        local_size=_int(env, "LOCAL_SIZE", None),
        master_addr=env.get("MASTER_ADDR") or None,
        master_port=_int(env, "MASTER_PORT", None),
    )


def check_autotp_env(tp_size: int, env: DistEnv, *, on_cpu: bool) -> None:
    """Raise ParallelConfigError unless DeepSpeed AutoTP with ``tp_size`` ranks can start in this process.

    ``tp_size > 1`` needs this process to be one of ``tp_size`` ranks started by a launcher. On DeepSpeed's CPU
    accelerator the ranks also need ``LOCAL_SIZE`` equal to the world size (the ``deepspeed`` launcher sets it,
    torchrun does not); without it the shared-memory all-reduce segfaults, so refusing here is the only safe answer.
    """
    if tp_size < 1:
        raise ParallelConfigError(f"tensor_parallel_size must be >= 1, got {tp_size}")
    if tp_size == 1:
        return
    if env.world_size != tp_size:
        raise ParallelConfigError(
            f"tensor_parallel_size={tp_size} needs {tp_size} ranks started by the deepspeed launcher "
            f"(`deepspeed --num_gpus {tp_size} ...`); this process sees WORLD_SIZE={env.world_size}"
        )
    if on_cpu and env.local_size != env.world_size:
        raise ParallelConfigError(
            f"DeepSpeed tensor parallelism on CPU needs LOCAL_SIZE == WORLD_SIZE ({env.world_size}); got "
            f"LOCAL_SIZE={env.local_size}. Start the ranks with the `deepspeed` launcher (torchrun does not set it)."
        )


def visible_gpu_count(env: Mapping[str, str] | None = None) -> int:
    """Number of CUDA devices this process may use (0 on a CPU-only machine)."""
    env = os.environ if env is None else env
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return 0
    try:
        import torch
    except ImportError:
        return 0
    try:
        return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0
    except Exception:  # a broken driver reads as "no GPU", the engines then run on CPU or fall back
        return 0


def device_indices(devices: Sequence[str]) -> list[int]:
    """The GPU indices of planned devices (``["cuda:2", "cuda:3"]`` -> ``[2, 3]``); anything else is refused."""
    out = []
    for device in devices:
        kind, _, index = str(device).partition(":")
        if kind != "cuda" or not index.isdigit():
            raise ParallelConfigError(f"planned device {device!r} is not a GPU (cuda:N)")
        out.append(int(index))
    if len(set(out)) != len(out):
        raise ParallelConfigError(f"planned devices {list(devices)} name a GPU twice")
    return out


def visible_devices_env(devices: Sequence[str]) -> dict[str, str]:
    """The environment that pins an engine's processes to the planned GPUs, rank i on ``devices[i]``.

    The planner's ``cuda:N`` are NVML's indices, which follow the PCI bus; CUDA numbers devices fastest first
    unless told otherwise, so the order is set too, or ``CUDA_VISIBLE_DEVICES=2`` could mean another GPU.
    """
    return {"CUDA_DEVICE_ORDER": "PCI_BUS_ID",
            "CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in device_indices(devices))}


def deepspeed_include(devices: Sequence[str]) -> str:
    """The ``deepspeed`` launcher's ``--include`` that starts a replica's ranks on its planned GPUs, rank i on
    ``devices[i]`` (the launcher sets each rank's ``CUDA_VISIBLE_DEVICES`` from it)."""
    return "localhost:" + ",".join(str(i) for i in device_indices(devices))


def deepspeed_rank_device(devices: Sequence[str], env: DistEnv, environ: Mapping[str, str]) -> str:
    """This DeepSpeed rank's planned device (``devices[local_rank]``), refused unless the GPU DeepSpeed will put
    the rank on is that one: DeepSpeed sets rank i on visible GPU i, so the launcher must have made the planned
    GPUs the visible ones, in order (``deepspeed --include``, named in the error)."""
    indices = device_indices(devices)
    if len(indices) != env.world_size:
        raise ParallelConfigError(
            f"the planner gave {len(indices)} device(s) ({', '.join(devices)}) for {env.world_size} DeepSpeed "
            "rank(s) (tensor_parallel_size)")
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    seen = [v.strip() for v in visible.split(",")] if visible else [str(i) for i in range(env.world_size)]
    if seen[:env.world_size] != [str(i) for i in indices]:
        raise ParallelConfigError(
            f"the planner placed this replica on {', '.join(devices)} but its ranks see GPUs "
            f"{','.join(seen[:env.world_size])}; start them with `deepspeed --include {deepspeed_include(devices)}`")
    return devices[env.local_rank]


def resolve_tp_size(requested: int | None, *, gpus: int) -> int:
    """``requested`` when set, else the number of visible GPUs (at least 1); refuses more ranks than GPUs."""
    if requested is None:
        return max(1, gpus)
    if requested < 1:
        raise ParallelConfigError(f"tensor_parallel_size must be >= 1, got {requested}")
    if gpus and requested > gpus:
        raise ParallelConfigError(f"tensor_parallel_size={requested} but only {gpus} GPU(s) are visible")
    return requested


def cpu_thread_binding(ranks: int, cpus: Sequence[int] | None = None) -> str:
    """vLLM's ``VLLM_CPU_OMP_THREADS_BIND`` value giving each of ``ranks`` CPU workers its own cores.

    Cores are split into contiguous, near-equal groups, ``|``-separated (``"0|1"`` for two ranks on two cores,
    ``"0-3|4-7"`` on eight). Fewer cores than ranks is refused: two ranks on one core deadlock OpenMP barriers.
    """
    if ranks < 1:
        raise ParallelConfigError(f"ranks must be >= 1, got {ranks}")
    if cpus is None:
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cpus = sorted(cpus)
    if len(cpus) < ranks:
        raise ParallelConfigError(f"{ranks} CPU ranks need at least {ranks} cores; this process may use {len(cpus)}")
    groups = []
    base, extra = divmod(len(cpus), ranks)
    start = 0
    for r in range(ranks):
        size = base + (1 if r < extra else 0)
        group = cpus[start:start + size]
        start += size
        groups.append(_ranges(group))
    return "|".join(groups)


def _ranges(cores: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    parts = []
    i = 0
    while i < len(cores):
        j = i
        while j + 1 < len(cores) and cores[j + 1] == cores[j] + 1:
            j += 1
        parts.append(str(cores[i]) if i == j else f"{cores[i]}-{cores[j]}")
        i = j + 1
    return ",".join(parts)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (for MASTER_PORT / a test server)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
