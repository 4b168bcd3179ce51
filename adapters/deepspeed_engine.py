"""DeepSpeed inference: ``deepspeed.init_inference`` with dtype, tensor parallelism (AutoTP) and kernel injection.

The model's parts are loaded by the family's loader (``adapters.hf_engine``) on the CPU, then the model is handed
to ``init_inference``, which shards it (``tensor_parallel={"tp_size": N}``), optionally swaps in DeepSpeed's fused
kernels (``replace_with_kernel_inject``, GPU only) and moves it to the accelerator. Serving runs the shared decode
loop on the wrapped module (``engine.module``), so greedy outputs equal the torch engine's.

Tensor parallelism is SPMD: every rank runs this engine and every forward pass, and ranks must see the same
requests in the same order. With ``tp_size == 1`` it runs in-process, no launcher and no process group needed.
With ``tp_size > 1`` the process must be one of ``tp_size`` ranks started by the ``deepspeed`` launcher
(``deepspeed --num_gpus N app.py``): on DeepSpeed's CPU accelerator (gloo plus a shared-memory all-reduce op)
``LOCAL_SIZE`` must equal the world size, which that launcher sets and torchrun does not; without it the ranks
segfault, so load refuses early with a clear error instead. Sampled requests without a seed get one chosen by
rank 0 and broadcast, so every rank draws the same tokens.

A replica the orchestrator's planner placed (``spec.options["devices"]``, ``cuda:N`` in rank order) runs on those
GPUs: one rank is initialised under ``torch.cuda.device(N)`` (DeepSpeed moves the model to the current device),
and with several ranks each one checks that the GPU DeepSpeed will give it (visible GPU ``LOCAL_RANK``) is its
planned one, which the launcher arranges with ``deepspeed --include localhost:N,M`` (``parallel.deepspeed_include``);
a launch that does not match is refused, naming that flag, rather than served on other GPUs than the plan says.

The shared-memory op compiles once (about 47 s here) into ``TORCH_EXTENSIONS_DIR``; when that is unset it is
pointed at ``$MUAI_CACHE_DIR/torch_extensions`` so the compile is paid once per machine, not once per run.

An init failure raises ``ModelLoadError`` (cause kept); the fallback chain then serves the next engine.
deepspeed and torch are imported only inside methods.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from adapters import _hf
from adapters.base import Availability, Capabilities, GenerationRequest, ModelLoadError, ModelSpec
from adapters.hf_decode import TorchEncode, TorchForward
from adapters.hf_engine import Backend, HfEngine, HfParts
from adapters.parallel import (
    ParallelConfigError,
    check_autotp_env,
    deepspeed_rank_device,
    device_indices,
    dist_env,
)

log = logging.getLogger(__name__)

__all__ = ["DeepSpeedEngine", "ensure_torch_extensions_dir"]


def ensure_torch_extensions_dir() -> str:
    """Point TORCH_EXTENSIONS_DIR at the project cache unless the environment already chose a folder."""
    current = os.environ.get("TORCH_EXTENSIONS_DIR")
    if current:
        return current
    from adapters.tiny import default_cache_dir

    folder = str(default_cache_dir() / "torch_extensions")
    os.environ["TORCH_EXTENSIONS_DIR"] = folder
    return folder


class DeepSpeedEngine(HfEngine):
    """A transformers model wrapped by ``deepspeed.init_inference``.

    Settings (``DeepSpeedEngineConfig``): ``tensor_parallel_size`` (AutoTP ranks; a model's own
    ``tensor_parallel_size`` > 1 wins), ``replace_with_kernel_inject``, ``dtype`` (inference dtype; default the
    model's). Per-model options as for the torch engine (``kv_cache``, ``inject_delay_s``).
    """

    name = "deepspeed"
    capabilities = Capabilities(streaming=True, tensor_parallel=True, max_batch_size=32)

    def __init__(self, settings: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(settings, **kwargs)
        self._world_size = 1
        self._device_index: int | None = None

    @classmethod
    def available(cls, settings: Mapping[str, Any] | None = None) -> Availability:
        for mod in ("deepspeed", "torch", "transformers"):
            if importlib.util.find_spec(mod) is None:
                return Availability(False, f"{mod} is not installed: pip install 'muai[deepspeed]'")
        return Availability(True)

    def _tp_size(self, spec: ModelSpec) -> int:
        if spec.tensor_parallel_size and spec.tensor_parallel_size > 1:
            return int(spec.tensor_parallel_size)
        return int(self.settings.get("tensor_parallel_size") or 1)

    @staticmethod
    def _planned_device(spec: ModelSpec, tp: int, *, on_cpu: bool) -> int | None:
        """The GPU index to initialise one rank under, None to leave DeepSpeed's choice (no plan, the CPU, or
        several ranks, whose launch is checked against the plan here)."""
        devices = tuple(spec.options.get("devices") or ())
        if not devices or on_cpu:
            return None
        if tp > 1:
            deepspeed_rank_device(devices, dist_env(), os.environ)
            return None
        if len(devices) != 1:
            raise ParallelConfigError(f"the planner gave {len(devices)} device(s) ({', '.join(devices)}) for one "
                                      "DeepSpeed rank (tensor_parallel_size = 1)")
        return device_indices(devices)[0]

    def _load_spec(self, spec: ModelSpec) -> ModelSpec:
        """Checks the launch before anything heavy (a wrong one must fail in milliseconds, not segfault after the
        compile); the parts load on the CPU, and init_inference shards them and moves each rank's shard to that
        rank's device."""
        tp = self._tp_size(spec)
        kernel_inject = bool(self.settings.get("replace_with_kernel_inject", False))
        import torch

        on_cpu = not torch.cuda.is_available()
        try:
            check_autotp_env(tp, dist_env(), on_cpu=on_cpu)
            self._device_index = self._planned_device(spec, tp, on_cpu=on_cpu)
        except ParallelConfigError as exc:
            raise ModelLoadError(f"model {spec.name!r}: {exc}", engine=self.name, model=spec.name,
                                 retryable=False) from exc
        if kernel_inject and on_cpu:
            raise ModelLoadError(
                f"model {spec.name!r}: replace_with_kernel_inject needs a GPU; DeepSpeed's CPU accelerator has no "
                "fused inference kernels", engine=self.name, model=spec.name, retryable=False,
            )
        return replace(spec, device="cpu", dtype=self.settings.get("dtype") or spec.dtype)

    def _backend(self, parts: HfParts, spec: ModelSpec) -> Backend:
        import torch

        tp = self._tp_size(spec)
        env = dist_env()
        kernel_inject = bool(self.settings.get("replace_with_kernel_inject", False))
        dtype_name = self.settings.get("dtype") or spec.dtype
        ensure_torch_extensions_dir()
        started = time.monotonic()
        try:
            import deepspeed
            from deepspeed.accelerator import get_accelerator

            dtype = _hf.resolve_dtype(dtype_name, engine=self.name, model=spec.name)
            index = self._device_index
            # DeepSpeed puts the model on the current device: the planned one, for this call only.
            with torch.cuda.device(index) if index is not None else contextlib.nullcontext():
                ds_engine = deepspeed.init_inference(
                    parts.model, dtype=dtype, tensor_parallel={"tp_size": tp}, replace_with_kernel_inject=kernel_inject
                )
                accel = get_accelerator()
                device = torch.device(accel.current_device_name())
        except Exception as exc:  # DeepSpeed raises anything from RuntimeError to AssertionError on a bad init
            raise ModelLoadError(
                f"model {spec.name!r}: deepspeed.init_inference failed (tp_size={tp}, "
                f"kernel_inject={kernel_inject}): {_hf.first_line(exc)}", engine=self.name, model=spec.name,
            ) from exc
        elapsed = time.monotonic() - started
        self._world_size = env.world_size
        info = {
            "tensor_parallel_size": tp,
            "rank": env.rank,
            "world_size": env.world_size,
            "replace_with_kernel_inject": kernel_inject,
            "inference_dtype": str(dtype_name),
            "accelerator": accel.device_name(),
            "communication_backend": accel.communication_backend_name(),
            "init_seconds": round(elapsed, 3),
            "deepspeed_version": deepspeed.__version__,
        }
        log.info("deepspeed serving %s (tp_size=%d, rank %d/%d, %s, init %.1fs)", spec.name, tp, env.rank,
                 env.world_size, accel.device_name(), elapsed)
        module = ds_engine.module
        if spec.task == "generate":
            return Backend(forward=TorchForward(module), model=module, device=device, info=info, keep=ds_engine)
        return Backend(encode=TorchEncode(module), model=module, device=device, info=info, keep=ds_engine)

    # ------------------------------------------------------------------------------------------ ranks agree
    def _prepare(self, batch: Sequence[GenerationRequest]) -> list[GenerationRequest]:
        """With several ranks, unseeded sampled requests get a seed chosen by rank 0, so all ranks agree."""
        if self._world_size <= 1:
            return list(batch)
        need = [i for i, r in enumerate(batch) if not r.sampling.greedy and r.sampling.seed is None]
        if not need:
            return list(batch)
        import torch.distributed as dist

        seeds = [int.from_bytes(os.urandom(4), "little") for _ in need]
        box: list[Any] = [seeds]
        dist.broadcast_object_list(box, src=0)
        out = list(batch)
        for i, seed in zip(need, box[0]):
            out[i] = replace(out[i], sampling=replace(out[i].sampling, seed=int(seed)))
        return out
