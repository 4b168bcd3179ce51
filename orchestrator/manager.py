"""The Model Manager: registered models, each served by a fallback chain of engines, with lifecycle and telemetry.

The existing contract is kept (13.4): ``register_model``, ``load_model(name, device=None, backend_override=None)``,
``get_model``, ``unload_model``, ``unload_all``, ``is_loaded`` and the blocking ``infer(model_name, inputs,
**kwargs)``. The server uses the async API: ``generate``, ``generate_stream``, ``embed``, ``aload_model``,
``snapshot`` (readiness: a read of state), ``status`` (the full, blocking sample), ``end_conversation``,
``apply_config`` and ``aclose``.

Each model gets an ``adapters.fallback.FallbackChain`` built from ``engines.preference`` (a model's ``engine``
forces that engine first, with torch behind it) and the per-engine settings. Requests to engines without
continuous batching of their own go through one dynamic batcher per model when ``batching.enabled``; otherwise,
and for engines that batch by themselves (vLLM), each request goes to the engine on its own. With every optimisation
off (batching off, KV cache off, preference ``["torch"]``) this is plain transformers inference (13.1).

Telemetry: each request gets an ``INTERNAL`` inference span (``orchestrator.inference_spans`` builds them), parented
to the span that was current when the request was submitted, even across the batcher's asyncio boundary. Lifecycle
events (``load_start``, ``load_ok``, ``load_fail``, ``unload``,
``fallback``) go to ``on_event``, batch sizes to ``on_batch(model, engine, size)``, fallbacks also to
``on_fallback(event)``. Hooks never break serving: their errors are logged.

Residency: with ``engines.resident_budget_bytes`` set, loading past it first unloads the least recently used models
that are neither ``preload`` nor ``required`` (``orchestrator.residency`` plans which); such a model loads again on
its next request. An ad-hoc chain (``infer(engine_preference=...)``) holds the model's weights once more and is
loaded within the same budget. Without it every loaded model stays loaded until unloaded.

Placement: where the server's ``DeviceBook`` (``manager.devices``) lists GPUs, a model on ``device: auto`` gets
its replicas' devices from the planner (``orchestrator.placement``: least loaded first, replicas apart, a TP x PP
replica on that many devices its engine is pinned to, refused with what is short); ``move_off(device)`` reloads
the models placed on a device that was cordoned after a fault.

What is apart: the model record and its events (``orchestrator.managed``), the status contract and its building
(``orchestrator.model_status``), span building (``orchestrator.inference_spans``), the blocking API
(``orchestrator.blocking``), the residency plan (``orchestrator.residency``), the placement plan and what it has
placed (``orchestrator.placement``: ``PlacementBook``) and the runtime-config diff (``orchestrator.runtime_config``).
Why this module is still over 800 lines: registry, load/unload with eviction and placement, and the serving paths
share one set of locks (the registry's, the residency lock, each model's) and the models' state; split across
classes, the lock order that keeps an eviction from deadlocking a load (and a move off a faulted device from
deadlocking the fail-over that asked for it) would be spread out too. What is left here is the shell of those cores.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace

from adapters.base import (
    EmbeddingResult,
    EngineError,
    GenerationRequest,
    GenerationResult,
    ModelSpec,
    StreamChunk,
)
from orchestrator.batcher import Batcher, Submission
from orchestrator.blocking import SyncRunner, blocking_infer
from orchestrator.config import ENGINE_NAMES, ModelConfig
from orchestrator.errors import (
    ModelLoadFailedError,
    ModelNotReadyError,
    UnknownModelError,
)
from orchestrator.inference_spans import (
    OP_EMBED,
    OP_GENERATE,
    TRACER_NAME,
    CallSpans,
    StreamSpan,
    base_attributes,
    embed_error,
    tracing_off,
)
from orchestrator.managed import (
    ManagedModel,
    ModelConfigError,
    ModelEvent,
    ModelState,
    weights_bytes,
)
from orchestrator.model_status import (
    EngineAvailability,
    ManagerStatus,
    ModelStatus,
    ProbeCache,
    chain_availability,
    model_status_of,
)
from orchestrator.placement import ModelDemand, PlacementBook, PlacementError
from orchestrator.residency import Resident, describe_held, plan_room
from orchestrator.runtime_config import diff_manager_config

if TYPE_CHECKING:
    from adapters.fallback import ChainStatus

log = logging.getLogger(__name__)

PROBE_CACHE_S = 300.0


def _call_hook(hook: Callable[..., Any] | None, *args: Any) -> None:
    if hook is None:
        return
    try:
        hook(*args)
    except Exception:
        log.exception("model manager hook %r failed", getattr(hook, "__name__", hook))


class ModelManager:
    """Registered models, their engines and lifecycle; the one way the server and workflows reach a model."""

    def __init__(
        self,
        config: Any,
        *,
        on_event: Callable[[ModelEvent], None] | None = None,
        tracer: trace.Tracer | None = None,
        engine_factory: Callable[..., Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_batch: Callable[[str, str, int], None] | None = None,
        on_fallback: Callable[[Any], None] | None = None,
    ) -> None:
        self.config = config
        self.on_event = on_event
        self.on_batch = on_batch
        self.on_fallback = on_fallback
        self.tracer = tracer if tracer is not None else trace.get_tracer(TRACER_NAME)
        self._tracer_given = tracer is not None
        self._engine_factory = engine_factory
        self._clock = clock
        self._models: dict[str, ManagedModel] = {}
        self._lock = threading.RLock()
        self._sync = SyncRunner()
        self._adhoc: dict[tuple[str, tuple[str, ...]], Any] = {}
        self._probes = ProbeCache(PROBE_CACHE_S, clock)
        # Replaced whole by each status() (never updated in place), so snapshot() reads it without a lock.
        self._availability: dict[str, EngineAvailability] = {}
        # Taken before any model's own lock by every load, so a load that evicts another model never waits on a
        # load that would evict it back.
        self._residency_lock = threading.Lock()
        self._reloads: dict[str, asyncio.Future[ManagedModel]] = {}
        # One byte budget for every model's conversation state (requirement 7.3), shared by their engines.
        self._kv_cache = self._shared_kv_cache(config)
        self.devices: Any = None
        """The server's ``DeviceBook``; with GPUs in it, models on ``device: auto`` are placed by the planner."""
        self._placements = PlacementBook()
        for model in config.models:
            self.register_model(model)

    # -- registry -------------------------------------------------------------------------------------------------

    def register_model(self, model_config: ModelConfig | Mapping[str, Any]) -> ManagedModel:
        """Register (or re-register, when not loaded) a model; loading is a separate step."""
        try:
            cfg = model_config if isinstance(model_config, ModelConfig) else ModelConfig.model_validate(model_config)
        except ValueError as exc:
            raise ModelConfigError(f"invalid model config: {exc}") from exc
        with self._lock:
            existing = self._models.get(cfg.name)
            if existing is not None:
                if existing.config == cfg:
                    return existing
                if existing.state in ("ready", "loading"):
                    raise ModelConfigError(f"model {cfg.name!r} is {existing.state}; unload it before changing its config")
            managed = self._models[cfg.name] = ManagedModel(cfg)
            return managed

    def models(self) -> list[str]:
        """Registered model names, in registration order."""
        return list(self._models)

    def _managed(self, name: str) -> ManagedModel:
        m = self._models.get(name)
        if m is None:
            raise UnknownModelError(name, self._models)
        return m

    def _ready(self, name: str) -> ManagedModel:
        m = self._models.get(name)
        if m is None:
            raise UnknownModelError(name, self._models)
        if m.state != "ready":
            raise ModelNotReadyError(name, m.state, m.error or "")
        return m

    def get_model(self, name: str) -> ManagedModel:
        """The loaded model; ``UnknownModelError`` when not registered, ``ModelNotReadyError`` when not loaded."""
        return self._ready(name)

    def is_loaded(self, name: str) -> bool:
        m = self._models.get(name)
        return m is not None and m.state == "ready"

    # -- lifecycle ------------------------------------------------------------------------------------------------

    def preference_for(self, cfg: ModelConfig, backend_override: str | None = None) -> list[str]:
        """Engines tried for ``cfg``: a forced engine (override, or the model's ``engine``) then torch; else the
        configured preference. Engines switched off in their section are left out."""
        forced = backend_override or cfg.engine
        order = [forced, "torch"] if forced else list(self.config.engines.preference)
        out: list[str] = []
        for name in order:
            section = getattr(self.config.engines, name, None) if name in ENGINE_NAMES else None
            if section is not None and not section.enabled and name != forced:
                continue
            if name not in out:
                out.append(name)
        return out

    def engine_settings(self) -> dict[str, dict[str, Any]]:
        """Each engine's settings as the plain dict its constructor takes."""
        out: dict[str, dict[str, Any]] = {name: getattr(self.config.engines, name).model_dump() for name in ENGINE_NAMES}
        out.setdefault("echo", {})
        return out

    def _spec(self, cfg: ModelConfig, device: str | None) -> ModelSpec:
        from adapters.tiny import resolve_model_path

        try:
            path = resolve_model_path(cfg.path)
        except FileNotFoundError as exc:
            raise ModelLoadFailedError(cfg.name, str(exc)) from exc
        options: dict[str, Any] = {"inject_delay_s": cfg.inject_delay_s}
        if self._kv_cache is not None and cfg.task == "generate":
            options["kv_cache"] = self._kv_cache
        return ModelSpec(
            name=cfg.name,
            path=path,
            task=cfg.task,
            device=device or cfg.device,
            dtype=cfg.dtype,
            tensor_parallel_size=cfg.tensor_parallel_size,
            pipeline_parallel_size=cfg.pipeline_parallel_size,
            max_model_len=cfg.max_model_len,
            options=options,
        )

    def _shared_kv_cache(self, config: Any) -> Any:
        from adapters.kvcache import ConversationCache

        kv = config.kv_cache
        if not kv.enabled:
            return None
        return ConversationCache(budget_bytes=kv.budget_bytes, idle_ttl_s=kv.idle_ttl_s, clock=self._clock)

    def _emit(self, event: ModelEvent) -> None:
        _call_hook(self.on_event, event)

    def _fallback_hook(self, model: str) -> Callable[[Any], None]:
        def hook(event: Any) -> None:
            log.warning("model %s: fallback %s -> %s (%s)", model, getattr(event, "from_engine", "?"),
                        getattr(event, "to_engine", "?"), getattr(event, "reason", ""))
            self._emit(ModelEvent("fallback", model, getattr(event, "to_engine", None),
                                  error=getattr(event, "reason", None), detail=event))
            _call_hook(self.on_fallback, event)

        return hook

    def _new_chain(self, spec: ModelSpec, preference: Sequence[str], replicas: int = 1,
                   devices: Sequence[Sequence[str]] | None = None) -> Any:
        """A fallback chain for ``spec``; with ``replicas`` > 1, that many behind one ``ReplicaSet``; ``devices``
        (per replica, its ranks' devices in rank order) as the planner placed them: the replica's engines get the
        first as ``spec.device`` and all of them as ``spec.options["devices"]``, which vLLM and DeepSpeed pin
        their ranks to."""
        if replicas > 1:
            from orchestrator.replicas import ReplicaSet

            return ReplicaSet([self._new_chain(spec, preference, devices=devices[i:i + 1] if devices else None)
                               for i in range(replicas)],
                              eject_s=self.config.engines.reprobe_after_s, clock=self._clock)
        if devices:
            ranks = tuple(devices[0])
            spec = replace(spec, device=ranks[0], options={**spec.options, "devices": ranks})
        from adapters.fallback import FallbackChain

        return FallbackChain(
            spec,
            list(preference),
            self.engine_settings(),
            on_fallback=self._fallback_hook(spec.name),
            reprobe_after_s=self.config.engines.reprobe_after_s,
            # An unload waits for running requests as long as a shutdown would.
            drain_timeout_s=self.config.server.drain_timeout_s,
            clock=self._clock,
            engine_factory=self._engine_factory,
        )

    # -- placement ---------------------------------------------------------------------------------------------

    def _place(self, m: ManagedModel, spec: ModelSpec, replica_bytes: int) -> list[tuple[str, ...]] | None:
        """The devices of each replica of ``m`` (``tensor_parallel_size x pipeline_parallel_size`` of them, in rank
        order), from the planner over the book's GPUs; None where there is nothing to plan (no book, no GPU in it,
        a device the model's config names). A model that does not fit fails to load, saying what is short."""
        cfg = m.config
        book = self.devices
        if book is None or cfg.device != "auto":
            return None
        gpus = [d for d in book.for_placement(self._clock()) if d.id.startswith("cuda")]
        if not gpus:
            return None
        demand = ModelDemand(cfg.name, weight_bytes=replica_bytes, tensor_parallel=cfg.tensor_parallel_size,
                             pipeline_parallel=cfg.pipeline_parallel_size, replicas=cfg.replicas)
        try:
            with self._lock:
                placed = self._placements.place(demand, gpus)
        except PlacementError as exc:
            raise ModelLoadFailedError(cfg.name, f"placement: {exc}") from None
        log.info("model %s placed on %s", cfg.name, ", ".join("+".join(p.devices) for p in placed))
        return [p.devices for p in placed]

    def placements(self) -> dict[str, list[str]]:
        """The devices each placed model's replicas sit on (``{"chat": ["cuda:0", "cuda:1"]}``)."""
        with self._lock:
            return self._placements.replicas()

    def models_on_devices(self) -> dict[str, list[str]]:
        """Per device, the models placed on it."""
        with self._lock:
            return self._placements.models_on()

    def move_off(self, device: str) -> list[str]:
        """Reload every model placed on ``device`` (which the book has cordoned) onto the devices still usable;
        the names moved. Requests meanwhile get 503 with Retry-After (the model is loading); a model that fits
        nowhere else is left failed, saying so."""
        with self._lock:
            affected = self._placements.models_using(device)
        moved = []
        for name in affected:
            log.warning("model %s: moving off %s", name, device)
            try:
                self.unload_model(name)
                self.load_model(name)
                moved.append(name)
            except Exception as exc:  # the model stays failed with its reason; readiness says so
                log.error("model %s could not move off %s: %s", name, device, exc)
        return moved

    def load_model(self, name: str, device: str | None = None, backend_override: str | None = None) -> ManagedModel:
        """Load ``name`` (blocking) on the first engine of its chain that works; a loaded model is reloaded only
        when ``device`` or ``backend_override`` asks for something else. Raises ``ModelLoadFailedError``."""
        m = self._managed(name)
        with self._residency_lock, m.lock:
            preference = tuple(self.preference_for(m.config, backend_override))
            if m.state == "ready" and device is None and (backend_override is None or m.preference == preference):
                return m
            if m.state == "ready":
                self._unload_locked(m)
            # ``evicted`` stays set until the load succeeds: requests arriving meanwhile wait for this reload.
            m.state, m.error = "loading", None
            self._emit(ModelEvent("load_start", name))
            started = self._clock()
            chain = None
            try:
                spec = self._spec(m.config, device)
                replica_bytes = weights_bytes(spec.path)
                # Each replica holds its own copy of the weights.
                m.weights_bytes = replica_bytes * m.config.replicas
                self._make_room(m)
                placed = self._place(m, spec, replica_bytes) if device is None else None
                chain = self._new_chain(spec, preference, m.config.replicas, devices=placed)
                chain.load()
            except Exception as exc:
                if chain is not None:
                    try:
                        chain.close()
                    except Exception:
                        log.exception("model %s: closing a chain that failed to load", name)
                reason = exc.reason if isinstance(exc, ModelLoadFailedError) else str(exc)
                m.state, m.error = "failed", reason
                duration = max(0.0, self._clock() - started)
                log.error("model %s failed to load in %.2fs: %s", name, duration, reason)
                self._emit(ModelEvent("load_fail", name, duration_s=duration, error=reason))
                if isinstance(exc, ModelLoadFailedError):
                    raise
                raise ModelLoadFailedError(name, reason) from exc
            duration = max(0.0, self._clock() - started)
            m.spec, m.chain, m.preference = spec, chain, preference
            m.load_duration_s = duration
            m.batcher = self._new_batcher(m) if self.config.batching.enabled else None
            m.state, m.last_used, m.evicted = "ready", self._clock(), False
            log.info("model %s loaded on %s in %.2fs", name, chain.engine_name, duration)
            self._emit(ModelEvent("load_ok", name, chain.engine_name, duration_s=duration))
            return m

    def _make_room(self, m: ManagedModel, need: int | None = None) -> None:
        """Unload least recently used evictable models until ``need`` more bytes for ``m`` (its weights by default)
        fit the resident budget (residency lock held); the choice is :func:`orchestrator.residency.plan_room`'s.
        ``m`` itself, when loaded (an ad-hoc chain for it is what needs the room), is held, never a victim."""
        budget = self.config.engines.resident_budget_bytes
        if budget is None:
            return
        need = m.weights_bytes if need is None else need

        def loaded() -> list[ManagedModel]:
            return [o for o in self._models.values() if o.state == "ready"]

        stuck: set[str] = set()  # victims that could not be unloaded: held, as if pinned, for the next plan

        def residents() -> list[Resident]:
            return [Resident(o.name, self._resident_bytes(o), o is not m and o.evictable and o.name not in stuck,
                             o.last_used)
                    for o in loaded()]

        while True:
            plan = plan_room(need, budget, residents())
            if not plan.fits or not plan.victims:
                break
            victim = self._models[plan.victims[0]]
            # Marked first: a request arriving while the victim drains waits for a reload instead of a 503.
            victim.evicted = True
            with victim.lock:
                if self._unload_locked(victim):
                    log.info("model %s unloaded to make room for %s (engines.resident_budget_bytes=%d)",
                             victim.name, m.name, budget)
                else:
                    stuck.add(victim.name)
                    if victim.state == "ready":
                        victim.evicted = False
        now = residents()
        resident = sum(r.weights_bytes for r in now)
        if resident + need > budget:
            raise ModelLoadFailedError(
                m.name,
                f"needs {need / 2**20:.1f} MiB but engines.resident_budget_bytes is {budget / 2**20:.1f} MiB "
                f"and the loaded models that may not be unloaded hold {resident / 2**20:.1f} MiB ({describe_held(now)}); "
                "raise the budget, or mark a model preload: false and required: false",
            )

    async def _serving(self, name: str) -> ManagedModel:
        """The ready model, loading it again first when the resident budget had unloaded it.

        One reload per model however many requests wait for it (they share its task); a waiter that goes away does
        not cancel the reload the others wait for."""
        m = self._models.get(name)
        if m is not None and m.evicted and m.state in ("unloaded", "loading"):
            task = self._reloads.get(name)
            if task is None or task.done():
                task = asyncio.ensure_future(self.aload_model(name))
                self._reloads[name] = task
                task.add_done_callback(lambda t, n=name: self._reloads.pop(n, None) if self._reloads.get(n) is t else None)
            await asyncio.shield(task)
        m = self._ready(name)
        m.last_used = self._clock()
        return m

    async def aload_model(self, name: str, device: str | None = None, backend_override: str | None = None) -> ManagedModel:
        """``load_model`` on a worker thread, so the event loop keeps serving other models meanwhile."""
        self._managed(name)
        return await asyncio.to_thread(self.load_model, name, device, backend_override)

    async def load_preloaded(self) -> dict[str, str | None]:
        """Load every ``preload`` model, one after another; returns each one's error (None when loaded)."""
        out: dict[str, str | None] = {}
        for m in list(self._models.values()):
            if m.config.preload and m.state != "ready":
                try:
                    await self.aload_model(m.name)
                    out[m.name] = None
                except ModelLoadFailedError as exc:
                    out[m.name] = exc.reason
        return out

    def _unload_locked(self, m: ManagedModel) -> bool:
        if m.state != "ready" or m.chain is None:
            return False
        with self._lock:
            self._placements.forget(m.name)
        engine = m.chain.engine_name
        chain, batcher = m.chain, m.batcher
        m.state, m.chain, m.batcher = "unloaded", None, None
        if batcher is not None:
            self._close_batcher_soon(batcher)
        try:
            chain.close()
        except Exception:
            log.exception("model %s: engine close failed", m.name)
        with self._lock:
            adhoc = [self._adhoc.pop(k) for k in [k for k in self._adhoc if k[0] == m.name]]
        for adhoc_chain in adhoc:
            try:
                adhoc_chain.close()
            except Exception:
                log.exception("model %s: closing an ad-hoc chain failed", m.name)
        self._emit(ModelEvent("unload", m.name, engine))
        return True

    @staticmethod
    def _close_batcher_soon(batcher: Batcher) -> None:
        # Requests still waiting are failed with BatcherClosedError: their engine is going away.
        loop = batcher.loop
        if loop is None or loop.is_closed() or not loop.is_running():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            loop.create_task(batcher.aclose(cancel_pending=True))
            return
        fut = asyncio.run_coroutine_threadsafe(batcher.aclose(cancel_pending=True), loop)
        try:
            fut.result(timeout=10)
        except Exception:
            log.exception("closing batcher %s failed", batcher.name)

    def unload_model(self, name: str) -> bool:
        """Unload ``name``; False when it was not loaded."""
        m = self._managed(name)
        with m.lock:
            return self._unload_locked(m)

    async def aunload_model(self, name: str) -> bool:
        """``unload_model`` on a worker thread: requests still waiting in the model's batcher get
        ``BatcherClosedError``, the batch already running finishes, then the engine is released."""
        self._managed(name)
        return await asyncio.to_thread(self.unload_model, name)

    def unload_all(self) -> int:
        """Unload every loaded model; the number unloaded."""
        return sum(self.unload_model(name) for name in list(self._models))

    # -- async serving API ----------------------------------------------------------------------------------------

    def _new_batcher(self, m: ManagedModel) -> Batcher:
        name = m.name

        async def run_batch(subs: Sequence[Submission]) -> list[Any]:
            return await self._run_submissions(m, subs)

        return Batcher.from_config(
            run_batch,
            self.config.batching,
            capture_context=otel_context.get_current,
            error_of=_batch_result_error,
            name=name,
        )

    def _batcher_for(self, m: ManagedModel) -> Batcher | None:
        # Read once: an unload on a worker thread may clear m.chain between two reads. Without a chain the
        # request goes direct, where _infer answers ModelNotReadyError.
        b, chain = m.batcher, m.chain
        if b is None or chain is None or chain.capabilities.continuous_batching:
            return None
        loop = b.loop
        # A batcher serves the loop it started on; a caller on another loop (the blocking API) goes direct.
        if loop is not None and loop is not asyncio.get_running_loop():
            return None
        return b

    async def generate(self, name: str, request: GenerationRequest) -> GenerationResult:
        """Generate for one request; raises the request's own ``EngineError`` when it failed."""
        m = await self._serving(name)
        if m.task != "generate":
            raise ModelNotReadyError(name, m.state, f"model {name!r} is an {m.task} model; it does not generate")
        b = self._batcher_for(m)
        if b is not None:
            return await b.submit(request, key=(OP_GENERATE, request.sampling.batch_key()), length=len(request.prompt))
        (result,) = await self._infer(m, OP_GENERATE, [request], [None], None)
        if result.error is not None:
            raise result.error
        return result

    async def embed(self, name: str, texts: Sequence[str]) -> list[EmbeddingResult]:
        """Embed ``texts`` (one request); raises the first text's ``EngineError`` when one failed. The engine gets
        them in calls of at most its ``capabilities.max_batch_size`` texts."""
        m = await self._serving(name)
        if m.task != "embed":
            raise ModelNotReadyError(name, m.state, f"model {name!r} is a {m.task} model; it does not embed")
        texts = list(texts)
        b = self._batcher_for(m)
        if b is not None:
            return await b.submit(texts, key=(OP_EMBED,), length=max((len(t) for t in texts), default=0))
        results = await self._infer(m, OP_EMBED, [texts], [None], None)
        err = embed_error(results[0])
        if err is not None:
            raise err
        return results[0]

    async def generate_stream(self, name: str, request: GenerationRequest) -> AsyncIterator[StreamChunk]:
        """Stream one request's completion (not batched); one inference span covers the whole stream."""
        m = await self._serving(name)
        if m.task != "generate":
            raise ModelNotReadyError(name, m.state, f"model {name!r} is an {m.task} model; it does not generate")
        chain = m.chain
        if chain is None:  # unloaded since _ready()
            raise ModelNotReadyError(name, m.state, m.error or "")
        engine_before = chain.engine_name
        span = StreamSpan(self.tracer, f"{OP_GENERATE} {name}")
        last: StreamChunk | None = None
        try:
            # Closed explicitly: when our caller leaves, the chain's stream (and through it the engine's) ends now,
            # handing back the engine's lease and cancelling its work, not whenever garbage collection gets to it.
            async with contextlib.aclosing(chain.generate_stream(request)) as stream:
                async for chunk in stream:
                    last = chunk
                    yield chunk
        except BaseException as exc:
            span.fail(exc)
            raise
        finally:
            span.end(self._base_attrs(m, OP_GENERATE, engine_before, 1) if span.recording else None, last)
            _call_hook(self.on_batch, name, chain.engine_name, 1)

    async def _run_submissions(self, m: ManagedModel, subs: Sequence[Submission]) -> list[Any]:
        op = subs[0].key[0]
        now = asyncio.get_running_loop().time()
        waits = [max(0.0, now - s.arrived) for s in subs]
        return await self._infer(m, op, [s.request for s in subs], [s.context for s in subs], waits)

    async def _infer(
        self,
        m: ManagedModel,
        op: str,
        payloads: Sequence[Any],
        contexts: Sequence[Any],
        waits: Sequence[float] | None,
    ) -> list[Any]:
        """One engine call for ``payloads`` (requests, or text lists for embeddings), with one span per request."""
        chain = m.chain
        if chain is None:
            raise ModelNotReadyError(m.name, m.state, m.error or "")
        engine_before = chain.engine_name
        tracer = None if tracing_off(self._tracer_given) else self.tracer
        spans = CallSpans(tracer, f"{op} {m.name}", contexts)
        size = len(payloads)
        try:
            if op == OP_GENERATE:
                results: list[Any] = list(await chain.generate(list(payloads)))
                n_results = len(results)
            else:
                flat = [t for texts in payloads for t in texts]
                vectors = await _embed_chunked(chain, flat)
                n_results = len(vectors)
                results, i = [], 0
                if n_results == len(flat):
                    for texts in payloads:
                        results.append(vectors[i:i + len(texts)])
                        i += len(texts)
            if n_results != (size if op == OP_GENERATE else sum(len(t) for t in payloads)):
                raise EngineError(
                    f"model {m.name!r}: engine {chain.engine_name} returned {n_results} results for "
                    f"{size if op == OP_GENERATE else sum(len(t) for t in payloads)} inputs",
                    engine=chain.engine_name, model=m.name, retryable=False,
                )
        except BaseException as exc:
            if spans.recording:
                spans.fail(self._base_attrs(m, op, engine_before, size), exc)
            _call_hook(self.on_batch, m.name, chain.engine_name, size)
            raise
        engine = chain.engine_name
        if spans.recording:
            spans.finish(self._base_attrs(m, op, engine_before, size), op, payloads, results, waits)
        _call_hook(self.on_batch, m.name, engine, size)
        return results

    def _base_attrs(self, m: ManagedModel, op: str, engine_before: str, size: int) -> dict[str, Any]:
        return base_attributes(m.name, op, m.chain, engine_before, size)

    # -- blocking API (existing contract) -------------------------------------------------------------------------

    def run_sync(self, coro: Any) -> Any:
        """Run a coroutine of this manager from blocking code (not from inside an event loop)."""
        return self._sync.run(coro)

    def infer(self, model_name: str, inputs: str | Sequence[str], **kwargs: Any) -> Any:
        """Blocking inference, the existing contract: a string in, a string (or an embedding) out; a list in, a
        list out, run as one engine batch. Keyword arguments: ``max_new_tokens``, ``temperature``, ``top_p``,
        ``stop``, ``seed``, ``engine_preference`` (engines to try for this call, e.g. ``["onnxruntime", "torch"]``).
        """
        return blocking_infer(self, model_name, inputs, **kwargs)

    def _with_preference(self, m: ManagedModel, preference: Iterable[str]) -> ManagedModel:
        """A view of ``m`` served by an ad-hoc chain for ``preference`` (``infer(engine_preference=...)``).

        The chain holds a second copy of the weights, so it is loaded as a model is: under the residency lock and
        the model's own lock (never the registry's lock, which every register and unload takes), and only once the
        resident budget has room for it; its bytes count as the model's until the model unloads, which closes it.
        """
        pref = tuple(preference)
        if m.chain is not None and pref and m.chain.engine_name == pref[0]:
            return m
        key = (m.name, pref)
        with self._lock:
            chain = self._adhoc.get(key)
        if chain is None:
            with self._residency_lock, m.lock:
                with self._lock:
                    chain = self._adhoc.get(key)
                if chain is None:
                    if m.state != "ready" or m.spec is None:
                        raise ModelNotReadyError(m.name, m.state, m.error or "")
                    self._make_room(m, need=m.weights_bytes)
                    chain = self._new_chain(m.spec, pref)
                    try:
                        chain.load()
                    except Exception as exc:
                        raise ModelLoadFailedError(m.name, f"with engine preference {list(pref)}: {exc}") from exc
                    with self._lock:
                        self._adhoc[key] = chain
        return ManagedModel(m.config, state="ready", spec=m.spec, chain=chain, preference=pref)

    def _resident_bytes(self, m: ManagedModel) -> int:
        """What ``m`` holds against the resident budget: its weights once per chain (its own and ad-hoc ones)."""
        with self._lock:
            adhoc = sum(1 for k in self._adhoc if k[0] == m.name)
        return m.weights_bytes * (1 + adhoc)

    # -- operations -----------------------------------------------------------------------------------------------

    def end_conversation(self, conversation_id: str) -> bool:
        """Release a conversation's cached state on every model; True when something was released."""
        released = False
        for m in list(self._models.values()):
            chain = m.chain
            if chain is not None and m.state == "ready":
                try:
                    released = bool(chain.end_conversation(conversation_id)) or released
                except Exception:
                    log.exception("model %s: end_conversation failed", m.name)
        return released

    def engine_of(self, name: str) -> str | None:
        """The engine serving ``name`` now (None when not loaded or nothing serves): read from its chain, so it
        follows loads, unloads and fallbacks without a copy to keep current."""
        m = self._models.get(name)
        chain = m.chain if m is not None else None
        return chain.engine_name if chain is not None else None

    def snapshot(self) -> ManagerStatus:
        """Every model's state, engine and degraded reasons, and the engines' availability as last sampled.

        A read of state, safe on the event loop at any rate (readiness calls it per probe): it asks no engine for
        its status (an engine's status may expire KV-cache entries), probes no engine (a probe may import an engine
        library) and changes nothing. Availability is sampled by :meth:`status`, which the server's background
        loop runs on a worker thread."""
        return ManagerStatus({m.name: model_status_of(m) for m in list(self._models.values())},
                             dict(self._availability))

    def _engines_status(self, chain_statuses: Iterable[ChainStatus]) -> dict[str, EngineAvailability]:
        """Availability per engine: what the loaded models' chains found (live), and for engines no chain holds,
        a registry probe cached for a while (probing may import an engine library: not on every sample)."""
        out = chain_availability(chain_statuses)
        wanted = [*self.config.engines.preference, *(e for m in self._models.values() for e in m.preference)]
        settings = self.engine_settings()
        for name in dict.fromkeys(wanted):
            if name not in out:
                out[name] = self._probes.get(name, settings.get(name, {}))
        return out

    def status(self) -> ManagerStatus:
        """The full status (blocking; run it on a worker thread): per model, state, engine, degraded reasons,
        batching and its chain's own status; per engine, availability and why not. Samples the availability that
        :meth:`snapshot` reports; ``as_dict()`` is the admin API's JSON.

        A model's reported ``state`` is ``unavailable`` (and ``servable`` False) when it was loaded but no engine of
        its chain serves it now (all failed; the chain retries them after their back-off)."""
        models: dict[str, ModelStatus] = {}
        chain_statuses: list[ChainStatus] = []
        for m in list(self._models.values()):
            chain = m.chain
            chain_status: ChainStatus | None = None
            chain_error: str | None = None
            if chain is not None:
                try:
                    chain_status = chain.status()
                    chain_statuses.append(chain_status)
                except Exception as exc:  # an engine's own status() failing must not hide the other models
                    log.warning("model %r: reading its chain's status failed: %s", m.name, exc)
                    chain_error = str(exc)
            models[m.name] = model_status_of(m, chain_status, chain_error)
        self._availability = self._engines_status(chain_statuses)
        return ManagerStatus(models, dict(self._availability))

    def batcher(self, name: str) -> Batcher | None:
        """The model's dynamic batcher (None when batching is off or the model is not loaded)."""
        return self._managed(name).batcher

    def apply_config(self, new_config: Any) -> list[str]:
        """Apply runtime changes (batch limits, KV-cache budget and idle TTL, ``inject_delay_s``); returns what
        changed. Critical keys are the config loader's business (``muai.config.apply_update`` refuses them)."""
        diff = diff_manager_config(self.config, new_config, [m.config for m in self._models.values()])
        self.config = new_config
        if diff.batch_limits:
            for m in list(self._models.values()):
                if m.batcher is not None:
                    m.batcher.set_limits(**diff.batch_limits)
        engine_changes: dict[str, Any] = {}
        if diff.kv_budget_bytes is not None:
            if self._kv_cache is not None:
                self._kv_cache.set_budget(diff.kv_budget_bytes)
            else:
                engine_changes["kv_cache_budget_bytes"] = diff.kv_budget_bytes
        if diff.kv_idle_ttl_changed and self._kv_cache is not None:
            self._kv_cache.set_idle_ttl(diff.kv_idle_ttl_s)
        new_models = {mc.name: mc for mc in new_config.models}
        for m in list(self._models.values()):
            per_model = dict(engine_changes)
            if m.name in diff.inject_delay_s:
                per_model["inject_delay_s"] = diff.inject_delay_s[m.name]
                # ModelConfig is frozen; the model keeps the config it will be reloaded with.
                m.config = new_models[m.name]
            if per_model and m.chain is not None:
                self._reconfigure(m, per_model)
        return diff.changed

    @staticmethod
    def _reconfigure(m: ManagedModel, changes: dict[str, Any]) -> None:
        chain = m.chain
        target = chain if hasattr(chain, "reconfigure") else chain.active_engine
        fn = getattr(target, "reconfigure", None)
        if fn is None:
            return
        try:
            fn(**changes)
        except Exception:
            log.exception("model %s: reconfigure %s failed", m.name, sorted(changes))

    async def aclose(self) -> None:
        """Finish waiting batches, unload every model and stop the blocking API's loop."""
        batchers = [m.batcher for m in self._models.values() if m.batcher is not None]
        running = asyncio.get_running_loop()
        await asyncio.gather(
            *(b.aclose() for b in batchers if b.loop is None or b.loop is running), return_exceptions=True
        )
        await asyncio.to_thread(self._close_sync)

    def close(self) -> None:
        """Blocking close, for code without an event loop."""
        self._close_sync()

    def _close_sync(self) -> None:
        self.unload_all()
        with self._lock:
            for chain in self._adhoc.values():
                try:
                    chain.close()
                except Exception:
                    log.exception("closing an ad-hoc chain failed")
            self._adhoc.clear()
        self._sync.close()


async def _embed_chunked(chain: Any, texts: list[str]) -> list[Any]:
    """``chain.embed`` in calls of at most the engine's ``max_batch_size`` texts, so that one request with many
    inputs (or a batch of them) never hands the engine more than it says it takes at once."""
    if not texts:
        return []
    size = max(1, int(getattr(chain.capabilities, "max_batch_size", 0) or len(texts)))
    if len(texts) <= size:
        return list(await chain.embed(texts))
    out: list[Any] = []
    for start in range(0, len(texts), size):
        out.extend(await chain.embed(texts[start:start + size]))
    return out


def _batch_result_error(result: Any) -> BaseException | None:
    if isinstance(result, list):
        return embed_error(result)
    return result.error


__all__ = ["ManagedModel", "ModelConfigError", "ModelEvent", "ModelManager", "ModelState"]
