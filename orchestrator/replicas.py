"""Replicas of one model (``models[].replicas``): several fallback chains behind the one chain interface.

Each replica is a whole ``FallbackChain`` (its own engine instance, on its own device where placement gave it one),
so a replica's engine failing falls back inside that replica as it always did. On top of that the set routes each
call to the usable replica with the fewest outstanding requests (ties: the one that has served fewest, so a
steady load splits evenly), and a replica whose call fails with an engine error (not a bad request) takes no new
work for ``eject_s``; the call is retried once on another replica, which is safe because nothing of it reached the
client. After ``eject_s`` the replica gets requests again, which is how its chain re-probes its engines.

The manager holds a ``ReplicaSet`` where it would hold a chain, so batching, spans, readiness and the admin status
read it as they read a chain; ``status()`` adds a ``replicas`` list (device, engine, outstanding, served, why it
takes no work) to the chain status shape.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from adapters.base import (
    Capabilities,
    EngineError,
    EngineUnavailableError,
    GenerationRequest,
    InvalidRequestError,
    StreamChunk,
)
from adapters.fallback import ChainStatus

log = logging.getLogger(__name__)

__all__ = ["Replica", "ReplicaSet", "ReplicaSetStatus", "ReplicaStatus"]


@dataclass(eq=False)
class Replica:
    index: int
    chain: Any
    device: str
    outstanding: int = 0
    served: int = 0
    failures: int = 0
    ejected_until: float | None = None
    last_error: str | None = None


@dataclass(frozen=True, slots=True)
class ReplicaStatus:
    index: int
    device: str
    engine: str | None
    loaded: bool
    outstanding: int
    served: int
    failures: int
    taking_work: bool
    reason: str | None

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "device": self.device, "engine": self.engine, "loaded": self.loaded,
                "outstanding": self.outstanding, "served": self.served, "failures": self.failures,
                "taking_work": self.taking_work, "reason": self.reason}


@dataclass(frozen=True, slots=True)
class ReplicaSetStatus(ChainStatus):
    """A chain status (the first serving replica's engines and facts) plus every replica's own line."""

    replicas: tuple[ReplicaStatus, ...] = field(default=())

    def as_dict(self) -> dict[str, Any]:
        # Named, not super(): a slotted dataclass is rebuilt as a new class, which zero-argument super() misses.
        return {**ChainStatus.as_dict(self), "replicas": [r.as_dict() for r in self.replicas]}


class ReplicaSet:
    """Routes a model's calls over its replicas' chains: fewest outstanding first, failed replicas skipped."""

    def __init__(
        self,
        chains: Sequence[Any],
        *,
        devices: Sequence[str] | None = None,
        eject_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not chains:
            raise ValueError("a replica set needs at least one chain")
        devices = list(devices) if devices is not None else [str(c.spec.device) for c in chains]
        if len(devices) != len(chains):
            raise ValueError(f"{len(chains)} chains but {len(devices)} devices")
        if eject_s <= 0:
            raise ValueError(f"eject_s must be > 0, got {eject_s}")
        self.replicas = [Replica(i, chain, device) for i, (chain, device) in enumerate(zip(chains, devices, strict=True))]
        self._eject_s = float(eject_s)
        self._clock = clock
        self._lock = threading.Lock()

    # -- the chain interface the manager and status readers use ------------------------------------------------
    @property
    def spec(self) -> Any:
        return self.replicas[0].chain.spec

    @property
    def model(self) -> str:
        return self.replicas[0].chain.model

    def _serving(self) -> Replica | None:
        return next((r for r in self.replicas if r.chain.loaded), None)

    @property
    def engine_name(self) -> str | None:
        r = self._serving()
        return r.chain.engine_name if r is not None else None

    @property
    def active_engine(self) -> Any:
        r = self._serving()
        if r is None:
            raise EngineUnavailableError(f"model {self.model!r}: no replica serves", model=self.model)
        return r.chain.active_engine

    @property
    def loaded(self) -> bool:
        return any(r.chain.loaded for r in self.replicas)

    @property
    def capabilities(self) -> Capabilities:
        r = self._serving()
        return r.chain.capabilities if r is not None else Capabilities()

    @property
    def degraded(self) -> bool:
        return bool(self.degraded_reasons)

    @property
    def degraded_reasons(self) -> list[str]:
        now = self._clock()
        reasons: list[str] = []
        for r in self.replicas:
            reasons.extend(f"replica {r.index}: {reason}" for reason in r.chain.degraded_reasons)
            why = self._not_taking_work(r, now)
            if why is not None:
                reasons.append(f"model {self.model!r} replica {r.index} on {r.device} takes no new work: {why}")
        return list(dict.fromkeys(reasons))

    def _not_taking_work(self, r: Replica, now: float) -> str | None:
        if r.ejected_until is not None and now < r.ejected_until:
            return f"{r.last_error} (retried in {r.ejected_until - now:.0f} s)"
        return None

    def status(self) -> ReplicaSetStatus:
        now = self._clock()
        chain_statuses = []
        for r in self.replicas:
            try:
                chain_statuses.append(r.chain.status())
            except Exception as exc:  # one replica's engine status failing must not hide the others
                log.warning("model %s replica %d: status failed: %s", self.model, r.index, exc)
                chain_statuses.append(None)
        first = next((s for s in chain_statuses if s is not None and s.active_engine is not None),
                     next((s for s in chain_statuses if s is not None), None))
        with self._lock:
            lines = tuple(
                ReplicaStatus(r.index, r.device, r.chain.engine_name, r.chain.loaded, r.outstanding, r.served,
                              r.failures, self._usable(r, now), self._not_taking_work(r, now)
                              or (None if r.chain.loaded else "no engine of its chain serves"))
                for r in self.replicas
            )
        return ReplicaSetStatus(
            model=self.model,
            active_engine=first.active_engine if first is not None else None,
            preference=first.preference if first is not None else (),
            degraded_reasons=tuple(self.degraded_reasons),
            engines=first.engines if first is not None else {},
            engine_status=first.engine_status if first is not None else None,
            fallbacks=sum(s.fallbacks for s in chain_statuses if s is not None),
            replicas=lines,
        )

    def load(self) -> Any:
        """Load every replica; the set serves when at least one loaded (the others are reported, not fatal)."""
        errors: list[BaseException] = []
        for r in self.replicas:
            try:
                r.chain.load()
            except Exception as exc:
                log.error("model %s replica %d on %s failed to load: %s", self.model, r.index, r.device, exc)
                self._eject(r, str(exc))
                errors.append(exc)
        if len(errors) == len(self.replicas):
            raise errors[0]
        return self.active_engine

    def close(self) -> None:
        for r in self.replicas:
            try:
                r.chain.close()
            except Exception:
                log.exception("model %s replica %d: close failed", self.model, r.index)

    def unload(self) -> None:
        self.close()

    def reconfigure(self, **changes: Any) -> None:
        for r in self.replicas:
            r.chain.reconfigure(**changes)

    def end_conversation(self, conversation_id: str) -> bool:
        return any([bool(r.chain.end_conversation(conversation_id)) for r in self.replicas])

    def stats(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for r in self.replicas:
            for key, value in r.chain.stats().items():
                out[key] = out.get(key, 0.0) + value
        return out

    # -- routing -------------------------------------------------------------------------------------------------
    def _usable(self, r: Replica, now: float) -> bool:
        return r.ejected_until is None or now >= r.ejected_until

    def _eject(self, r: Replica, reason: str) -> None:
        with self._lock:
            r.failures += 1
            r.last_error = reason
            r.ejected_until = self._clock() + self._eject_s

    def _acquire(self, exclude: set[int]) -> Replica:
        now = self._clock()
        with self._lock:
            candidates = [r for r in self.replicas if r.index not in exclude and self._usable(r, now)]
            if not candidates:
                raise EngineUnavailableError(
                    f"model {self.model!r}: no replica takes work now ({len(self.replicas)} replica(s), "
                    f"{len(exclude)} just failed)", model=self.model)
            # A replica back from its ejection competes as an equal: the request it gets is what makes its chain
            # re-probe its engines, and if that fails the request is retried on another replica.
            chosen = min(candidates, key=lambda r: (r.outstanding, r.served, r.index))
            chosen.outstanding += 1
            return chosen

    def _release(self, r: Replica, ok: bool) -> None:
        with self._lock:
            r.outstanding -= 1
            if ok:
                r.served += 1
                r.ejected_until = None

    async def _call(self, fn: Callable[[Any], Awaitable[Any]]) -> Any:
        tried: set[int] = set()
        while True:
            r = self._acquire(tried)
            ok = False
            try:
                result = await fn(r.chain)
                ok = True
                return result
            except InvalidRequestError:
                ok = True  # the request was bad, not the replica
                raise
            except EngineError as exc:
                self._eject(r, str(exc))
                tried.add(r.index)
                log.warning("model %s replica %d on %s failed; it takes no new work for %.0f s: %s",
                            self.model, r.index, r.device, self._eject_s, exc)
                if len(tried) > 1 or len(tried) == len(self.replicas):
                    raise  # retried once already, or nowhere else to go
            finally:
                self._release(r, ok)

    async def generate(self, batch: Sequence[GenerationRequest]) -> list[Any]:
        return await self._call(lambda chain: chain.generate(batch))

    async def embed(self, texts: Sequence[str]) -> list[Any]:
        return await self._call(lambda chain: chain.embed(texts))

    async def generate_stream(self, request: GenerationRequest) -> AsyncIterator[StreamChunk]:
        tried: set[int] = set()
        while True:
            r = self._acquire(tried)
            ok = started = False
            try:
                async with contextlib.aclosing(r.chain.generate_stream(request)) as stream:
                    async for chunk in stream:
                        started = True
                        yield chunk
                ok = True
                return
            except InvalidRequestError:
                ok = True
                raise
            except EngineError as exc:
                self._eject(r, str(exc))
                tried.add(r.index)
                # Once the client has part of the answer, another replica cannot take over.
                if started or len(tried) > 1 or len(tried) == len(self.replicas):
                    raise
            finally:
                self._release(r, ok)
