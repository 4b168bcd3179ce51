"""The fallback chain: one model served by the first engine of a preference order that works.

Why this module is over 700 lines: it is the shell of one object whose parts share one lock and one invariant (an
engine is closed exactly once, by whoever sees it last: the switch that replaced it, the last request leaving it,
or ``close()``): loading and switching, the leases of requests in flight, retiring and draining. Split across
modules, that invariant would have no one place to be read; what could be pure is already apart
(``adapters.chain_policy``).

``load()`` walks the preference (default vllm -> deepspeed -> onnxruntime -> torch): engines disabled in their
settings are skipped silently; unavailable ones (not installed, no hardware, or refusing this model's settings,
e.g. DeepSpeed tensor parallelism without its launcher) and ones that fail to load are skipped with a log line, a
``FallbackEvent`` and a degraded reason. Only an error about the model itself (``EngineError.fatal``: its path is
missing or holds no model) ends the walk, and only in ``load()``: no engine can load what is not there.

At inference, a retryable ``EngineError`` (the engine itself failed: a crash, a dead worker) moves the model to
the next engine the same way and the request is retried there, after one failure. A non-retryable one goes
straight back to the caller and the model stays where it is: a bad request, and a batch that ran out of memory
(the engines report out-of-memory as non-retryable; so does the chain for an engine's own raw ``MemoryError`` /
``OutOfMemoryError``), which the next engine would not serve either.

A failed engine is not written off: after ``reprobe_after_s`` (doubling with every further failure, capped at
``max_backoff_s``) it is tried again, in the background of the next request (or by ``await reprobe()``), and a
more preferred engine that works again takes the model back. Degraded reasons list the more preferred engines that
are not serving and why; they clear once the first choice serves again.

The old engine is closed once the requests already running on it finish; so are all engines on ``close()``, which
waits for them at most ``drain_timeout_s`` and then closes them anyway.

Which engine should serve, and when a failed one is tried again, is a pure core (``adapters.chain_policy``) that
takes ``now``; this module is the shell around it: the engines, their loading, the requests in flight.

Locking: loading an engine takes seconds to minutes, so it never happens under the lock that requests and status
reads take (``_lock``, held only for a few assignments). Switches (load, fail-over, re-activation, re-probe) run on
a thread of their own and are serialised by a second lock, ``_switch``; a new engine is created and loaded outside
``_lock`` and installed under it. Requests that need a switch wait for it on an asyncio future, never on a thread:
concurrent requests that need the same switch (all that failed on one engine, say) share one, and the default
thread pool stays free for everyone else while an engine loads.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from adapters import registry
from adapters._hf import is_out_of_memory
from adapters.chain_policy import ChainPolicy, EngineSnapshot
from adapters.base import (
    Capabilities,
    EmbeddingResult,
    Engine,
    EngineError,
    EngineUnavailableError,
    GenerationRequest,
    GenerationResult,
    InferenceError,
    ModelLoadError,
    ModelSpec,
    StreamChunk,
)

log = logging.getLogger(__name__)

__all__ = ["ChainConfigError", "ChainStatus", "EngineSnapshot", "FallbackChain", "FallbackEvent"]

EngineFactory = Callable[[str, Mapping[str, Any]], Engine]


class ChainConfigError(EngineError, ValueError):
    """The chain was built with a bad preference (empty, duplicated) or bad timings."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False)


@dataclass(frozen=True, slots=True)
class FallbackEvent:
    """The model moved from one engine to another (``to_engine`` None: no engine left).

    ``reason`` is one of ``unavailable``, ``load_error``, ``inference_error`` (fallbacks) or ``recovered`` (a more
    preferred engine took the model back; reported through ``on_recovery``); ``detail`` is the error message.
    """

    model: str
    from_engine: str
    to_engine: str | None
    reason: str
    detail: str
    at: float
    device: str | None = None
    """The device an ``inference_error`` broke (``DeviceFaultError``), for the orchestrator to cordon."""


@dataclass(frozen=True, slots=True)
class ChainStatus:
    """A chain at one instant: which engine serves, why the model is degraded, each engine's state and back-off.

    ``engine_status`` is the active engine's own facts (``Engine.status()``: execution provider, TP size, its KV
    cache, vLLM's counters); they differ per engine by design, so they stay a mapping that readers pass through to
    operators and never branch on."""

    model: str
    active_engine: str | None
    preference: tuple[str, ...]
    degraded_reasons: tuple[str, ...]
    engines: Mapping[str, EngineSnapshot]
    engine_status: Mapping[str, Any] | None
    fallbacks: int

    @property
    def degraded(self) -> bool:
        return bool(self.degraded_reasons)

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "active_engine": self.active_engine,
            "preference": list(self.preference),
            "degraded": self.degraded,
            "degraded_reasons": list(self.degraded_reasons),
            "engines": {name: st.as_dict() for name, st in self.engines.items()},
            "engine_status": dict(self.engine_status) if self.engine_status is not None else None,
            "fallbacks": self.fallbacks,
        }


class FallbackChain:
    """Serves one model from the most preferred engine that works, falling back and coming back as they fail/heal."""

    def __init__(
        self,
        spec: ModelSpec,
        preference: Sequence[str],
        settings: Mapping[str, Mapping[str, Any]] | None = None,
        *,
        on_fallback: Callable[[FallbackEvent], None] | None = None,
        on_recovery: Callable[[FallbackEvent], None] | None = None,
        reprobe_after_s: float = 60.0,
        max_backoff_s: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
        engine_factory: EngineFactory | None = None,
        auto_reprobe: bool = True,
        drain_timeout_s: float = 30.0,
    ) -> None:
        names = list(preference)
        if not names:
            raise ChainConfigError(f"model {spec.name!r}: engine preference is empty")
        if len(set(names)) != len(names):
            raise ChainConfigError(f"model {spec.name!r}: engine preference lists an engine twice: {names}")
        if engine_factory is None:
            known = registry.engine_names()
            for n in names:
                if n not in known:
                    raise registry.UnknownEngineError(
                        f"unknown engine {n!r} in the preference of model {spec.name!r}; known engines: "
                        f"{', '.join(known)}", engine=n)
        if reprobe_after_s <= 0 or max_backoff_s < reprobe_after_s:
            raise ChainConfigError(
                f"reprobe_after_s must be > 0 and <= max_backoff_s, got {reprobe_after_s} / {max_backoff_s}")
        if drain_timeout_s < 0:
            raise ChainConfigError(f"drain_timeout_s must be >= 0, got {drain_timeout_s}")
        self.spec = spec
        self._policy = ChainPolicy(names, settings, reprobe_after_s=reprobe_after_s, max_backoff_s=max_backoff_s)
        self._on_fallback = on_fallback
        self._on_recovery = on_recovery
        self._clock = clock
        self._factory: EngineFactory = engine_factory or registry.create_engine
        self._auto_reprobe = auto_reprobe
        self._drain_timeout_s = float(drain_timeout_s)
        self._runtime: dict[str, Any] = {}
        # Short critical sections only (state, in-flight counts); never held while an engine loads or closes.
        self._lock = threading.RLock()
        self._drained = threading.Condition(self._lock)
        # Serialises switches (load, fail-over, re-probe), which load engines while holding it; never taken on an
        # event loop's thread.
        self._switch = threading.RLock()
        self._switches: dict[Hashable, concurrent.futures.Future[Any]] = {}
        """Switches under way, by what they do; a request needing one already running waits for that one."""
        self._active: Engine | None = None
        self._in_flight: dict[int, int] = {}
        self._retired: list[Engine] = []
        """Replaced engines still running requests; the last one to finish closes it."""
        self._draining: list[Engine] = []
        """Engines ``close()`` waits for; it closes them itself."""
        self._reprobe_task: asyncio.Task[bool] | None = None
        self._closed = False

    # ------------------------------------------------------------------------------------------ properties
    @property
    def model(self) -> str:
        return self.spec.name

    @property
    def active_engine(self) -> Engine:
        engine = self._active
        if engine is None:
            raise EngineUnavailableError(self._nothing_serves_message(), engine="", model=self.model)
        return engine

    @property
    def engine_name(self) -> str | None:
        """The preference entry serving now (None when nothing serves)."""
        index = self._policy.active
        return self._policy.engines[index].name if index is not None else None

    @property
    def loaded(self) -> bool:
        return self._active is not None

    @property
    def capabilities(self) -> Capabilities:
        engine = self._active
        return engine.capabilities if engine is not None else Capabilities()

    @property
    def degraded(self) -> bool:
        return bool(self.degraded_reasons)

    @property
    def degraded_reasons(self) -> list[str]:
        with self._lock:
            return self._policy.degraded_reasons(self.model, serving=self._active is not None, closed=self._closed)

    def status(self) -> ChainStatus:
        """Per-engine availability and why not, the active engine, degraded reasons, fallback count. Asks the
        active engine for its facts (``Engine.status()``), so call it from a worker thread, not an event loop."""
        now = self._clock()
        with self._lock:
            engines = self._policy.snapshot(now)
            active = self._active
            fallbacks = self._policy.fallbacks
        return ChainStatus(
            model=self.model,
            active_engine=self.engine_name,
            preference=tuple(st.name for st in self._policy.engines),
            degraded_reasons=tuple(self.degraded_reasons),
            engines=engines,
            engine_status=active.status() if active is not None else None,
            fallbacks=fallbacks,
        )

    # ------------------------------------------------------------------------------------------ lifecycle
    def load(self) -> Engine:
        """Load the model on the most preferred engine that can; raises when none can. Idempotent.

        A fatal load error (the path does not exist, holds no model) is raised at once: no engine can load what
        is not there. An engine's own error (its settings, its start) only moves the walk to the next engine.
        """
        events: list[FallbackEvent] = []
        try:
            with self._switch:
                with self._lock:
                    if self._active is not None:
                        return self._active
                    self._closed = False
                self._probe_all()
                engine = self._activate(self._clock(), events, raise_fatal=True)
            if engine is None:
                raise EngineUnavailableError(self._nothing_serves_message(), model=self.model)
            return engine
        finally:
            self._emit(events)

    async def aload(self) -> Engine:
        return await self._switched("load", self.load)

    def close(self) -> None:
        """Unload every engine once the requests running on it finish; safe to call twice.

        New requests are refused at once. Engines with requests in flight are closed when those finish, or after
        ``drain_timeout_s`` regardless (their callers then get ``EngineUnavailableError``). Called from a worker
        thread it returns when every engine is closed; called on an event loop's thread it does not wait (the
        requests it would wait for need that loop): a background thread closes the busy engines.
        """
        task, self._reprobe_task = self._reprobe_task, None
        if task is not None and not task.done():
            try:
                task.get_loop().call_soon_threadsafe(task.cancel)
            except RuntimeError:  # its loop is closed: the task will never run again anyway
                pass
        with self._lock:
            self._closed = True
            engines = [e for e in (self._active, *self._retired) if e is not None]
            self._active, self._retired = None, []
            self._policy.stand_down()
            busy = [e for e in engines if self._in_flight.get(id(e), 0) > 0]
            self._draining.extend(busy)
        for engine in engines:
            if engine not in busy:
                _close_quietly(engine)
        if not busy:
            return
        if _on_event_loop():
            threading.Thread(target=self._drain, args=(busy,), name=f"muai-drain-{self.model}", daemon=True).start()
        else:
            self._drain(busy)

    def _drain(self, engines: list[Engine]) -> None:
        deadline = time.monotonic() + self._drain_timeout_s
        with self._drained:
            while any(self._in_flight.get(id(e), 0) for e in engines):
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning("model %s: %d request(s) still running after %.0f s; closing the engine anyway",
                                self.model, sum(self._in_flight.get(id(e), 0) for e in engines),
                                self._drain_timeout_s)
                    break
                self._drained.wait(left)
            for engine in engines:
                if engine in self._draining:
                    self._draining.remove(engine)
        for engine in engines:
            _close_quietly(engine)

    def unload(self) -> None:
        self.close()

    def reconfigure(self, **changes: Any) -> None:
        """Runtime changes (``inject_delay_s``, ``kv_cache_budget_bytes``, ...) for this and any later engine."""
        self._runtime.update(changes)
        engine = self._active
        if engine is not None:
            _reconfigure(engine, changes)

    def end_conversation(self, conversation_id: str) -> bool:
        engine = self._active
        return engine.end_conversation(conversation_id) if engine is not None else False

    def stats(self) -> dict[str, float]:
        engine = self._active
        return dict(engine.stats()) if engine is not None else {}

    # ------------------------------------------------------------------------------------------ inference
    async def generate(self, batch: Sequence[GenerationRequest]) -> list[GenerationResult]:
        return await self._call(lambda engine: engine.generate(batch))

    async def embed(self, texts: Sequence[str]) -> list[EmbeddingResult]:
        return await self._call(lambda engine: engine.embed(texts))

    async def generate_stream(self, request: GenerationRequest) -> AsyncIterator[StreamChunk]:
        """Streams from the active engine; an engine failing before its first chunk is replaced and retried."""
        self._maybe_start_reprobe()
        while True:
            engine = await self._acquire()
            started = False
            try:
                # Closed explicitly: when our caller leaves, the engine's stream ends (its work is cancelled) before
                # the engine's lease is given back, not whenever the garbage collector gets to it.
                async with contextlib.aclosing(engine.generate_stream(request)) as stream:
                    async for chunk in stream:
                        started = True
                        yield chunk
                return
            except Exception as exc:
                if started:  # the client has part of the answer: another engine cannot take over
                    raise
                error = _failure(engine, self.model, exc)
            finally:
                self._leave(engine)
            if not await self._fail_over_async(engine, error):
                raise error

    async def _call(self, fn: Callable[[Engine], Awaitable[Any]]) -> Any:
        self._maybe_start_reprobe()
        while True:
            engine = await self._acquire()
            try:
                return await fn(engine)
            except Exception as exc:  # an engine bug still gets the next engine's chance
                error = _failure(engine, self.model, exc)
            finally:
                self._leave(engine)
            if not await self._fail_over_async(engine, error):
                raise error

    async def _acquire(self) -> Engine:
        """The serving engine, counted in flight (so it is not closed under the request)."""
        while True:
            engine = await self._serving_engine()
            with self._lock:
                # Re-checked under the lock: a switch may have retired (and closed) it since it was read.
                if engine is self._active:
                    self._in_flight[id(engine)] = self._in_flight.get(id(engine), 0) + 1
                    return engine

    async def _serving_engine(self) -> Engine:
        engine = self._active
        if engine is not None:
            return engine
        if self._closed:
            raise EngineUnavailableError(f"model {self.model!r} is not loaded", model=self.model)
        # Nothing serves (every engine failed, or a switch is under way): try again those whose back-off is over.
        engine = await self._switched("activate", self._reactivate)
        if engine is None:
            if self._closed:
                raise EngineUnavailableError(f"model {self.model!r} is not loaded", model=self.model)
            raise EngineUnavailableError(self._nothing_serves_message(), model=self.model)
        return engine

    def _reactivate(self) -> Engine | None:
        events: list[FallbackEvent] = []
        try:
            with self._switch:
                if self._active is not None or self._closed:
                    return self._active
                return self._activate(self._clock(), events, raise_fatal=False)
        finally:
            self._emit(events)

    # ------------------------------------------------------------------------------------------ switches
    async def _switched(self, key: Hashable, job: Callable[[], Any]) -> Any:
        """Run ``job`` on a switch thread of its own, or join the same switch already under way; await its result.

        The waiting is on the event loop (a future), so however many requests wait for an engine to load, no thread
        of the default pool is parked for them (see the module docstring).
        """
        with self._lock:
            future = self._switches.get(key)
            start = future is None
            if future is None:
                future = concurrent.futures.Future()
                future.set_running_or_notify_cancel()  # a waiter that is cancelled cannot cancel it for the others
                self._switches[key] = future
        if start:
            threading.Thread(target=self._run_switch, args=(key, future, job), name=f"muai-switch-{self.model}",
                             daemon=True).start()
        return await asyncio.wrap_future(future)

    def _run_switch(self, key: Hashable, future: concurrent.futures.Future[Any], job: Callable[[], Any]) -> None:
        try:
            result = job()
        except BaseException as exc:  # handed to every waiter
            with self._lock:
                self._switches.pop(key, None)
            future.set_exception(exc)
        else:
            with self._lock:
                self._switches.pop(key, None)
            future.set_result(result)

    async def _fail_over_async(self, engine: Engine, error: EngineError) -> bool:
        """Every request that failed on ``engine`` waits for the one fail-over away from it."""
        return bool(await self._switched(("fail_over", id(engine)), lambda: self._fail_over(engine, error)))

    # ------------------------------------------------------------------------------------------ re-probing
    def reprobe_due(self, now: float | None = None) -> bool:
        """A more preferred engine than the active one has sat out its back-off."""
        now = self._clock() if now is None else now
        with self._lock:
            return self._policy.reprobe_due(now)

    async def reprobe(self) -> bool:
        """Try the more preferred engines whose back-off is over; True when one of them took the model back."""
        return bool(await self._switched("reprobe", self.reprobe_sync))

    def reprobe_sync(self) -> bool:
        events: list[FallbackEvent] = []
        try:
            with self._switch:
                now = self._clock()
                with self._lock:
                    if self._closed or self._policy.active is None:
                        return False
                    old, old_index = self._active, self._policy.active
                    due = self._policy.reprobe_candidates(now)
                for index in due:
                    st = self._policy.engines[index]
                    engine = self._try(index, now, events=None, raise_fatal=False)
                    if engine is None:
                        continue
                    with self._lock:
                        installed = self._install(engine, index)
                        if installed:
                            closing = self._retire(old)
                    if not installed:  # closed while it loaded
                        _close_quietly(engine)
                        return False
                    _close_quietly(closing)
                    old_name = self._policy.engines[old_index].name
                    detail = f"{st.name} serves {self.model} again, instead of {old_name}"
                    log.info("model %s: %s", self.model, detail)
                    events.append(FallbackEvent(self.model, old_name, st.name, "recovered", detail, now))
                    return True
                return False
        finally:
            for ev in events:
                _call_hook(self._on_recovery, ev)

    def _maybe_start_reprobe(self) -> None:
        if not self._auto_reprobe or self._closed or not self.reprobe_due():
            return
        if self._reprobe_task is not None and not self._reprobe_task.done():
            return
        self._reprobe_task = asyncio.get_running_loop().create_task(self.reprobe())

    async def wait_reprobe(self) -> bool | None:
        """Wait for a background re-probe started by a request (None when none ran)."""
        task = self._reprobe_task
        if task is None:
            return None
        return await task

    # ------------------------------------------------------------------------------------------ switching
    def _probe_all(self) -> None:
        for index, st in enumerate(self._policy.engines):
            if not self._policy.enabled(index):
                with self._lock:
                    self._policy.disable(index)
                continue
            try:
                engine = self._factory(st.name, st.settings)
                av = engine.available(st.settings)
            except EngineError as exc:
                available, reason = False, str(exc)
            except Exception as exc:
                available, reason = False, f"{type(exc).__name__}: {exc}"
            else:
                available, reason = av.ok, "" if av.ok else (av.reason or "not available")
            with self._lock:
                self._policy.probed(index, available, reason)

    def _activate(self, now: float, events: list[FallbackEvent], *, raise_fatal: bool) -> Engine | None:
        """Load the first engine that is not disabled or backing off; records a pending event per skipped one.

        ``_switch`` held, ``_lock`` not: engines load here. ``raise_fatal`` only for ``load()``: at run time the model
        was loadable once, so a fatal error (its files gone) is that engine's failure like any other.
        """
        skipped: list[tuple[str, str, str]] = []
        chosen: Engine | None = None
        with self._lock:
            candidates = self._policy.candidates(now)
        for index in candidates:
            engine = self._try(index, now, events=skipped, raise_fatal=raise_fatal)
            if engine is not None:
                with self._lock:
                    installed = self._install(engine, index)
                if not installed:  # closed while it loaded
                    _close_quietly(engine)
                    break
                chosen = engine
                break
        to = chosen.name if chosen is not None else None
        with self._lock:
            self._policy.count_fallbacks(len(skipped))  # counted with the switch, not when the hooks hear of it
        for name, reason, detail in skipped:
            events.append(FallbackEvent(self.model, name, to, reason, detail, now))
            log.warning("model %s: engine %s %s (%s); %s", self.model, name, reason, detail,
                        f"serving on {to}" if to else "no engine left")
        return chosen

    def _try(
        self, index: int, now: float, *, events: list[tuple[str, str, str]] | None, raise_fatal: bool
    ) -> Engine | None:
        """Create, check and load one engine; on failure mark it, start its back-off, note why.

        Runs without ``_lock`` (loading takes long). A non-retryable load error that is not fatal (the engine's
        own settings, e.g. tensor parallelism it cannot set up here) marks the engine unavailable for this model.
        """
        st = self._policy.engines[index]
        try:
            engine = self._factory(st.name, st.settings)
            av = engine.available(st.settings)
        except Exception as exc:
            self._mark(index, "unavailable", str(exc), now, events)
            return None
        with self._lock:
            st.available = av.ok
        if not av.ok:
            self._mark(index, "unavailable", av.reason or "not available", now, events)
            return None
        try:
            engine.load(self.spec)
        except EngineError as exc:
            _close_quietly(engine)
            if exc.fatal and raise_fatal:
                # The model itself is bad (no such path, not a model): another engine will not do better.
                raise
            if not exc.retryable and not exc.fatal:
                with self._lock:
                    st.available = False
                self._mark(index, "unavailable", str(exc), now, events)
            else:
                self._mark(index, "failed", str(exc), now, events, reason="load_error")
            return None
        except Exception as exc:
            _close_quietly(engine)
            err = ModelLoadError(f"engine {st.name} failed to load {self.model!r}: {type(exc).__name__}: {exc}",
                                 engine=st.name, model=self.model)
            err.__cause__ = exc
            self._mark(index, "failed", str(err), now, events, reason="load_error")
            return None
        if self._runtime:
            _reconfigure(engine, self._runtime)
        return engine

    def _mark(self, index: int, state: str, detail: str, now: float, events: list[tuple[str, str, str]] | None,
              *, reason: str | None = None) -> None:
        with self._lock:
            backoff = self._policy.mark(index, state, detail, now)
        name = self._policy.engines[index].name
        if events is not None:
            events.append((name, reason or state, detail))
        else:
            log.info("model %s: re-probe of %s failed (%s); next try in %.0f s", self.model, name, detail, backoff)

    def _install(self, engine: Engine, index: int) -> bool:
        """Make ``engine`` the serving one; False when the chain was closed while it loaded. ``_lock`` held."""
        if self._closed:
            return False
        self._policy.install(index)
        self._active = engine
        log.info("model %s: serving on engine %s", self.model, self._policy.engines[index].name)
        return True

    def _fail_over(self, engine: Engine, error: EngineError) -> bool:
        """``engine`` failed at inference: mark it, move to the next engine. True when something serves now."""
        events: list[FallbackEvent] = []
        try:
            with self._switch:
                with self._lock:
                    if self._closed:
                        return False
                    if self._active is not engine:
                        # Another request already moved the model on (or a re-probe did): just retry there.
                        return self._active is not None
                    index = self._policy.active
                    assert index is not None
                    now = self._clock()
                    st = self._policy.engines[index]
                    self._active = None
                    closing = self._retire(engine)
                    self._policy.mark(index, "failed", str(error), now)
                    self._policy.count_fallbacks(1)
                _close_quietly(closing)
                chosen = self._activate(now, events, raise_fatal=False)
                to = chosen.name if chosen is not None else None
                events.insert(0, FallbackEvent(self.model, st.name, to, "inference_error", str(error), now,
                                               device=getattr(error, "device", None)))
                log.warning("model %s: engine %s failed at inference (%s); %s", self.model, st.name, error,
                            f"serving on {to}" if to else "no engine left")
                return chosen is not None
        finally:
            self._emit(events)

    def _retire(self, engine: Engine | None) -> Engine | None:
        """``_lock`` held: an idle engine is returned for the caller to close (outside the lock); a busy one is
        closed by the last request to leave it."""
        if engine is None:
            return None
        if self._in_flight.get(id(engine), 0) == 0:
            return engine
        self._retired.append(engine)
        return None

    def _leave(self, engine: Engine) -> None:
        with self._lock:
            left = self._in_flight.get(id(engine), 1) - 1
            if left > 0:
                self._in_flight[id(engine)] = left
                return
            self._in_flight.pop(id(engine), None)
            if engine in self._draining:
                self._drained.notify_all()  # ``close()`` is waiting for it and closes it
                return
            if engine not in self._retired:
                return
            self._retired.remove(engine)
        if _on_event_loop():
            # Closing can take long (vLLM stops its engine process): not on the event loop.
            threading.Thread(target=_close_quietly, args=(engine,), name=f"muai-close-{engine.name}",
                             daemon=True).start()
        else:
            _close_quietly(engine)

    def _emit(self, events: list[FallbackEvent]) -> None:
        """Tell the hooks (outside every lock); the policy counted these events when the switch made them."""
        for ev in events:
            if ev.reason != "recovered":
                _call_hook(self._on_fallback, ev)

    def _nothing_serves_message(self) -> str:
        with self._lock:
            return self._policy.nothing_serves_message(self.model)


def _failure(engine: Engine, model: str, exc: Exception) -> EngineError:
    """The error to fail over on; raises it instead when no other engine would do better (not retryable)."""
    error = exc if isinstance(exc, EngineError) else _wrap(engine, model, exc)
    if not error.retryable:
        if error is exc:
            raise exc
        raise error from exc
    return error


def _wrap(engine: Engine, model: str, exc: BaseException) -> InferenceError:
    """An engine's raw exception as an InferenceError; running out of memory is not the engine's fault (see the
    module docstring), so it is not retryable."""
    err = InferenceError(f"engine {engine.name} raised {type(exc).__name__}: {exc}", engine=engine.name, model=model,
                         retryable=not is_out_of_memory(exc))
    err.__cause__ = exc
    return err


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _reconfigure(engine: Engine, changes: Mapping[str, Any]) -> None:
    fn = getattr(engine, "reconfigure", None)
    if fn is None:
        return
    try:
        fn(**changes)
    except Exception:
        log.exception("engine %s: reconfigure(%s) failed", engine.name, sorted(changes))


def _close_quietly(engine: Engine | None) -> None:
    if engine is None:
        return
    try:
        engine.close()
    except Exception:
        log.exception("engine %s: close failed", engine.name)


def _call_hook(hook: Callable[[FallbackEvent], None] | None, event: FallbackEvent) -> None:
    if hook is None:
        return
    try:
        hook(event)
    except Exception:  # a telemetry hook must never break serving
        log.exception("fallback hook failed for %s", event)
