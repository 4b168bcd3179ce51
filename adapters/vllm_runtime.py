"""The vLLM engine's runtime pieces that are not the adapter itself: its statistics and the stat logger that feeds
them, one ``AsyncLLM`` start on a worker thread (``EngineStart``), the scoped start environment, the executors that
pin an engine to its planned GPUs, trace headers, and stopping the engine loop.

vllm is imported only inside functions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from adapters import _hf

log = logging.getLogger(__name__)

__all__ = ["DEVICE_ENV_KEY", "EngineStart", "PINNED_EXECUTORS", "PIPELINE_CPU_WORKER", "STOP_TIMEOUT_S", "VllmStats", "scoped_env", "shutdown_quietly",
           "stat_logger_factory", "stop_loop", "trace_headers"]

STOP_TIMEOUT_S = 60.0
# vLLM reads these while it starts; they are process-global, so starts are serialised.
_ENV_LOCK = threading.Lock()


@dataclass(slots=True)
class VllmStats:
    """vLLM's scheduler and iteration statistics, accumulated (counters) or latest (gauges). Thread-safe."""

    prefix_cache_queries: int = 0
    """Prompt tokens looked up in the prefix cache."""
    prefix_cache_hits: int = 0
    """Prompt tokens found there."""
    num_requests_running: int = 0
    num_requests_waiting: int = 0
    max_requests_running: int = 0
    """The most requests vLLM ran in one step so far: above 1 means requests were batched together."""
    num_preemptions: int = 0
    kv_cache_usage: float = 0.0
    """Share of KV-cache blocks in use, 0..1."""
    prompt_tokens: int = 0
    generation_tokens: int = 0
    requests_finished: int = 0

    def record(self, scheduler_stats: Any, iteration_stats: Any) -> None:
        """Fold one update from vLLM's stat logger interface in."""
        with _STATS_LOCK:
            if scheduler_stats is not None:
                self.num_requests_running = int(scheduler_stats.num_running_reqs)
                self.num_requests_waiting = int(scheduler_stats.num_waiting_reqs)
                self.max_requests_running = max(self.max_requests_running, self.num_requests_running)
                self.kv_cache_usage = float(scheduler_stats.kv_cache_usage)
                pc = scheduler_stats.prefix_cache_stats
                if pc is not None:
                    self.prefix_cache_queries += int(pc.queries)
                    self.prefix_cache_hits += int(pc.hits)
            if iteration_stats is not None:
                self.num_preemptions += int(iteration_stats.num_preempted_reqs)
                self.prompt_tokens += int(iteration_stats.num_prompt_tokens)
                self.generation_tokens += int(iteration_stats.num_generation_tokens)
                self.requests_finished += len(iteration_stats.finished_requests)

    def as_dict(self) -> dict[str, float]:
        with _STATS_LOCK:
            return {name: float(getattr(self, name)) for name in self.__dataclass_fields__}


# One lock for all VllmStats: updates are rare (one per engine step) and tiny, contention is nil.
_STATS_LOCK = threading.Lock()


def stat_logger_factory(stats: VllmStats) -> Any:
    """A per-engine stat logger factory for ``AsyncLLM(stat_loggers=[...])`` that feeds ``stats``."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class _Logger(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            self.engine_index = engine_index

        def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
                   engine_idx: int = 0) -> None:
            stats.record(scheduler_stats, iteration_stats)

        def log_engine_initialized(self) -> None:
            pass

    return _Logger


@contextlib.contextmanager
def scoped_env(updates: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of an engine start, then put the old values back."""
    old = {k: os.environ.get(k) for k in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def trace_headers() -> dict[str, str] | None:
    """The current OpenTelemetry context as W3C headers (``traceparent``, ``tracestate``), when a span is active."""
    try:
        from opentelemetry import propagate, trace
    except ImportError:  # tracing is optional
        return None
    if not trace.get_current_span().get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier or None


def shutdown_quietly(llm: Any) -> None:
    try:
        llm.shutdown()
    except Exception as exc:  # shutting down must not fail the caller; the process exits anyway
        log.warning("vllm: shutdown raised %s", _hf.first_line(exc))


class EngineStart:
    """One ``AsyncLLM`` start on a worker thread: handed to ``load``, or shut down when ``load`` gave up on it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._abandoned = False
        self._llm: Any = None

    def build(self, loop: asyncio.AbstractEventLoop, args_kw: dict[str, Any], stats: VllmStats,
              env: Mapping[str, str]) -> None:
        """Start vLLM (on a worker thread); ``take()`` hands the engine over.

        The environment vLLM reads while it starts is set here, for exactly as long as the start runs (a start
        that ``load`` gave up on keeps it, and keeps other starts waiting, until it is over).
        """
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        # Whatever asks for "the" event loop while vLLM builds its clients gets the engine loop they will run on.
        asyncio.set_event_loop(loop)
        try:
            with _ENV_LOCK, scoped_env(env):
                llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**args_kw),
                                                stat_loggers=[stat_logger_factory(stats)])
        finally:
            asyncio.set_event_loop(None)
        # The engine is handed over through ``self`` and not kept in this frame: vLLM keeps tracebacks of imports
        # it tried while starting, and through them this frame, which would keep the engine alive after unload.
        with self._lock:
            if not self._abandoned:
                self._llm, llm = llm, None
                return
        log.warning("vllm: a start that timed out finished after all; shutting it down")
        shutdown_quietly(llm)
        llm = None

    def take(self) -> Any:
        with self._lock:
            llm, self._llm = self._llm, None
        if llm is None:
            raise RuntimeError("vLLM returned no engine")
        return llm

    def abandon(self) -> Any:
        """Give up on the start; returns the engine when it was built already (the caller shuts it down)."""
        with self._lock:
            self._abandoned = True
            llm, self._llm = self._llm, None
        return llm



PIPELINE_CPU_WORKER = f"{__name__}.PipelineCPUWorker"
"""vLLM's ``worker_cls`` for pipeline parallelism on CPU (see ``_pipeline_cpu_worker``)."""


def _pipeline_cpu_worker() -> type:
    """vLLM's CPU worker, with the buffer a later pipeline stage receives its input in.

    vLLM's model runner allocates that buffer (``intermediate_tensors``) only in its warm-up run, and the CPU worker
    skips the warm-up when the model runs eagerly (``CompilationMode.NONE``) with an explicit KV-cache size, which
    is how this adapter always starts it (and ``warming_up_model`` returns at once in eager mode anyway). Every
    stage after the first then fails its first step (``assert self.intermediate_tensors is not None`` in
    ``GPUModelRunner.sync_and_gather_intermediate_tensors``), so the buffer is allocated here after the start,
    as the warm-up run would have.
    """
    from vllm.distributed.parallel_state import get_pp_group
    from vllm.v1.worker.cpu_worker import CPUWorker

    class PipelineCPUWorker(CPUWorker):  # type: ignore[misc, valid-type]
        def compile_or_warm_up_model(self) -> Any:
            times = super().compile_or_warm_up_model()
            runner = self.model_runner
            if not get_pp_group().is_first_rank and runner.intermediate_tensors is None:
                runner.intermediate_tensors = runner.model.make_empty_intermediate_tensors(
                    batch_size=runner.max_num_tokens, dtype=runner.model_config.dtype, device=runner.device)
            return times

    PipelineCPUWorker.__qualname__ = "PipelineCPUWorker"
    return PipelineCPUWorker


DEVICE_ENV_KEY = "muai_device_env"
"""The key, in vLLM's ``additional_config``, of the environment a pinned executor sets in the EngineCore process."""

PINNED_EXECUTORS = {"mp": f"{__name__}.PinnedMultiprocExecutor", "uni": f"{__name__}.PinnedUniProcExecutor"}
"""vLLM's ``distributed_executor_backend`` for an engine pinned to planned GPUs: several ranks, one rank."""


def _pinned_executor(base_name: str) -> type:
    """vLLM's executor ``base_name``, setting ``additional_config[DEVICE_ENV_KEY]`` in its process first.

    The executor is built inside the EngineCore process vLLM spawns, before any rank touches CUDA, and its ranks
    run there (one rank) or in processes it spawns and which inherit its environment (several). So
    ``CUDA_VISIBLE_DEVICES`` reaches exactly that engine's ranks: the serving process's own ``os.environ``, which
    every other model's engine reads while it starts, is never changed for it (``scoped_env`` would change it for
    the whole start, and a torch engine initialising CUDA meanwhile would see only this engine's GPUs).
    """
    if base_name == "PinnedMultiprocExecutor":
        from vllm.v1.executor.multiproc_executor import MultiprocExecutor as base
    else:
        from vllm.v1.executor.uniproc_executor import UniProcExecutor as base

    class Pinned(base):  # type: ignore[misc, valid-type]
        def _init_executor(self) -> None:
            extra = getattr(self.vllm_config, "additional_config", None) or {}
            env = extra.get(DEVICE_ENV_KEY) if isinstance(extra, dict) else None
            if env:
                os.environ.update({str(k): str(v) for k, v in env.items()})
                log.info("vllm: EngineCore pid %d pinned to %s", os.getpid(), env)
            super()._init_executor()

    Pinned.__name__ = Pinned.__qualname__ = base_name
    Pinned.__module__ = __name__
    return Pinned


def __getattr__(name: str) -> Any:
    # vLLM resolves ``worker_cls`` and ``distributed_executor_backend`` by name in its own processes; the classes
    # are built on first use there so that importing this module does not import vllm.
    if name == "PipelineCPUWorker":
        cls = _pipeline_cpu_worker()
    elif name in ("PinnedMultiprocExecutor", "PinnedUniProcExecutor"):
        cls = _pinned_executor(name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = cls
    return cls


def stop_loop(loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> bool:
    """Cancel the engine loop's tasks, stop it and join its thread; False (logged) when it did not stop cleanly."""

    async def drain() -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    clean = True
    if loop.is_running():
        try:
            asyncio.run_coroutine_threadsafe(drain(), loop).result(timeout=STOP_TIMEOUT_S)
        except Exception as exc:  # a task that refuses to die must not block unload
            clean = False
            log.warning("vllm: the engine loop's tasks did not finish within %.0f s (%s); stopping it anyway",
                        STOP_TIMEOUT_S, _hf.first_line(exc) or type(exc).__name__)
        loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=STOP_TIMEOUT_S)
    if thread.is_alive():
        clean = False
        log.warning("vllm: the engine loop thread %s is still running after %.0f s; leaving it", thread.name,
                    STOP_TIMEOUT_S)
    else:
        loop.close()
    return clean
