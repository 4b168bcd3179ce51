"""The fallback chain: one model served by the first engine of a preference order that works.

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

Locking: loading an engine takes seconds to minutes, so it never happens under the lock that requests and status
reads take (``_lock``, held only for a few assignments). Switches (load, fail-over, re-probe) are serialised by a
second lock, ``_switch``, which only worker threads wait on: a new engine is created and loaded outside ``_lock``
and installed under it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from adapters import registry
from adapters._hf import is_out_of_memory
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

__all__ = ["ChainConfigError", "FallbackChain", "FallbackEvent"]

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


@dataclass(slots=True)
class _State:
    name: str
    settings: dict[str, Any]
    state: str = "untried"  # untried | active | standby | unavailable | failed | disabled
    available: bool | None = None
    reason: str = ""
    failures: int = 0
    retry_at: float | None = None


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
        settings = settings or {}
        self.spec = spec
        self._states = [_State(n, dict(settings.get(n) or {})) for n in names]
        self._on_fallback = on_fallback
        self._on_recovery = on_recovery
        self._reprobe_after_s = float(reprobe_after_s)
        self._max_backoff_s = float(max_backoff_s)
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
        self._active: Engine | None = None
        self._active_index: int | None = None
        self._in_flight: dict[int, int] = {}
        self._retired: list[Engine] = []
        """Replaced engines still running requests; the last one to finish closes it."""
        self._draining: list[Engine] = []
        """Engines ``close()`` waits for; it closes them itself."""
        self._reprobe_task: asyncio.Task[bool] | None = None
        self._fallbacks = 0
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
        index = self._active_index
        return self._states[index].name if index is not None else None

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
            upto = self._active_index if self._active_index is not None else len(self._states)
            out = []
            for st in self._states[:upto]:
                if st.state in ("unavailable", "failed"):
                    out.append(f"{st.name} {st.state}: {st.reason}")
            if self._active is None and not self._closed:
                out.append(self._nothing_serves_message())
            return out

    def status(self) -> dict[str, Any]:
        """Per-engine availability and why not, the active engine, degraded reasons, fallback count."""
        now = self._clock()
        with self._lock:
            engines = {}
            for st in self._states:
                engines[st.name] = {
                    "state": st.state,
                    "available": st.available,
                    "reason": st.reason,
                    "failures": st.failures,
                    "retry_in_s": max(0.0, st.retry_at - now) if st.retry_at is not None else None,
                }
            active = self._active
        reasons = self.degraded_reasons
        return {
            "model": self.model,
            "active_engine": self.engine_name,
            "preference": [st.name for st in self._states],
            "degraded": bool(reasons),
            "degraded_reasons": reasons,
            "engines": engines,
            "engine_status": active.status() if active is not None else None,
            "fallbacks": self._fallbacks,
        }

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
        return await asyncio.to_thread(self.load)

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
            self._active, self._active_index, self._retired = None, None, []
            for st in self._states:
                if st.state == "active":
                    st.state = "standby"
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
                async for chunk in engine.generate_stream(request):
                    started = True
                    yield chunk
                return
            except Exception as exc:
                if started:  # the client has part of the answer: another engine cannot take over
                    raise
                error = _failure(engine, self.model, exc)
            finally:
                self._leave(engine)
            if not await asyncio.to_thread(self._fail_over, engine, error):
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
            if not await asyncio.to_thread(self._fail_over, engine, error):
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
        events: list[FallbackEvent] = []
        try:
            engine = await asyncio.to_thread(self._reactivate, events)
        finally:
            self._emit(events)
        if engine is None:
            if self._closed:
                raise EngineUnavailableError(f"model {self.model!r} is not loaded", model=self.model)
            raise EngineUnavailableError(self._nothing_serves_message(), model=self.model)
        return engine

    def _reactivate(self, events: list[FallbackEvent]) -> Engine | None:
        with self._switch:
            if self._active is not None or self._closed:
                return self._active
            return self._activate(self._clock(), events, raise_fatal=False)

    # ------------------------------------------------------------------------------------------ re-probing
    def reprobe_due(self, now: float | None = None) -> bool:
        """A more preferred engine than the active one has sat out its back-off."""
        now = self._clock() if now is None else now
        upto = self._active_index if self._active_index is not None else len(self._states)
        return any(
            st.state in ("unavailable", "failed") and st.retry_at is not None and st.retry_at <= now
            for st in self._states[:upto]
        )

    async def reprobe(self) -> bool:
        """Try the more preferred engines whose back-off is over; True when one of them took the model back."""
        return await asyncio.to_thread(self.reprobe_sync)

    def reprobe_sync(self) -> bool:
        events: list[FallbackEvent] = []
        try:
            with self._switch:
                if self._closed or self._active_index is None or not self.reprobe_due():
                    return False
                now = self._clock()
                old, old_index = self._active, self._active_index
                for index, st in enumerate(self._states[:old_index]):
                    if st.state not in ("unavailable", "failed") or st.retry_at is None or st.retry_at > now:
                        continue
                    engine = self._try(index, now, events=None, raise_fatal=False)
                    if engine is None:
                        continue
                    with self._lock:
                        installed = self._install(engine, index)
                        if installed:
                            self._states[old_index].state = "standby"
                            closing = self._retire(old)
                    if not installed:  # closed while it loaded
                        _close_quietly(engine)
                        return False
                    _close_quietly(closing)
                    old_name = self._states[old_index].name
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
        for st in self._states:
            if not st.settings.get("enabled", True):
                with self._lock:
                    st.state, st.available, st.reason = "disabled", False, "disabled by config"
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
                st.available, st.reason = available, reason

    def _activate(self, now: float, events: list[FallbackEvent], *, raise_fatal: bool) -> Engine | None:
        """Load the first engine that is not disabled or backing off; records a pending event per skipped one.

        ``_switch`` held, ``_lock`` not: engines load here. ``raise_fatal`` only for ``load()``: at run time the model
        was loadable once, so a fatal error (its files gone) is that engine's failure like any other.
        """
        skipped: list[tuple[str, str, str]] = []
        chosen: Engine | None = None
        for index, st in enumerate(self._states):
            if st.state == "disabled":
                continue
            if st.retry_at is not None and st.retry_at > now:
                continue
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
        st = self._states[index]
        try:
            engine = self._factory(st.name, st.settings)
            av = engine.available(st.settings)
        except Exception as exc:
            self._mark(st, "unavailable", str(exc), now, events)
            return None
        with self._lock:
            st.available = av.ok
        if not av.ok:
            self._mark(st, "unavailable", av.reason or "not available", now, events)
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
                self._mark(st, "unavailable", str(exc), now, events)
            else:
                self._mark(st, "failed", str(exc), now, events, reason="load_error")
            return None
        except Exception as exc:
            _close_quietly(engine)
            err = ModelLoadError(f"engine {st.name} failed to load {self.model!r}: {type(exc).__name__}: {exc}",
                                 engine=st.name, model=self.model)
            err.__cause__ = exc
            self._mark(st, "failed", str(err), now, events, reason="load_error")
            return None
        if self._runtime:
            _reconfigure(engine, self._runtime)
        return engine

    def _mark(self, st: _State, state: str, detail: str, now: float, events: list[tuple[str, str, str]] | None,
              *, reason: str | None = None) -> None:
        with self._lock:
            st.state, st.reason = state, detail
            st.failures += 1
            backoff = min(self._reprobe_after_s * 2 ** (st.failures - 1), self._max_backoff_s)
            st.retry_at = now + backoff
        if events is not None:
            events.append((st.name, reason or state, detail))
        else:
            log.info("model %s: re-probe of %s failed (%s); next try in %.0f s", self.model, st.name, detail, backoff)

    def _install(self, engine: Engine, index: int) -> bool:
        """Make ``engine`` the serving one; False when the chain was closed while it loaded. ``_lock`` held."""
        if self._closed:
            return False
        st = self._states[index]
        st.state, st.available, st.reason, st.failures, st.retry_at = "active", True, "", 0, None
        self._active, self._active_index = engine, index
        log.info("model %s: serving on engine %s", self.model, st.name)
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
                    index = self._active_index
                    assert index is not None
                    now = self._clock()
                    st = self._states[index]
                    self._active, self._active_index = None, None
                    closing = self._retire(engine)
                _close_quietly(closing)
                self._mark(st, "failed", str(error), now, events=None)
                chosen = self._activate(now, events, raise_fatal=False)
                to = chosen.name if chosen is not None else None
                events.insert(0, FallbackEvent(self.model, st.name, to, "inference_error", str(error), now))
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
        for ev in events:
            if ev.reason != "recovered":
                self._fallbacks += 1
                _call_hook(self._on_fallback, ev)

    def _nothing_serves_message(self) -> str:
        parts = [f"{st.name}: {st.reason or st.state}" for st in self._states]
        return f"no engine can serve model {self.model!r} ({'; '.join(parts)})"


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
