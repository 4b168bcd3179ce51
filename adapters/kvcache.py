"""Accounting for multi-turn KV-cache reuse: one byte budget for all conversations, LRU eviction, idle expiry.

``ConversationCache`` is a pure core: it holds opaque payloads (the torch engine stores a conversation's
``DynamicCache`` and the token ids it covers) with their exact size in bytes, and decides what stays. It does no
I/O and takes ``now`` as an argument (defaulting to its clock), so tests drive it with a clock they advance.
Dropping a payload is all it takes to free its memory: nothing else keeps a reference.

Sizes are counted from the tensors themselves (``numel() * element_size()`` summed over every layer's keys and
values, see ``tensor_bytes``), never estimated from shapes in the config.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from adapters.base import EngineError

log = logging.getLogger(__name__)

__all__ = ["CacheEntry", "CacheStats", "ConversationCache", "KvCacheError", "tensor_bytes"]


class KvCacheError(EngineError, ValueError):
    """Bad cache settings (negative budget, non-positive TTL, unknown option)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False)


@dataclass(frozen=True, slots=True)
class CacheStats:
    """A snapshot of the cache's counters; ``hit_rate`` is hits / (hits + misses), 0 before any lookup."""

    hits: int
    misses: int
    evictions: int
    bytes_held: int
    entries: int
    budget_bytes: int = 0
    expirations: int = 0
    """Conversations dropped because they sat idle past the TTL (not counted as evictions)."""
    rejected: int = 0
    """States not kept because they alone exceed the budget."""
    releases: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def as_dict(self) -> dict[str, float]:
        out: dict[str, float] = asdict(self)
        out["hit_rate"] = self.hit_rate
        return out


@dataclass(slots=True)
class CacheEntry:
    """One conversation's cached state; ``payload`` is whatever the engine stored."""

    payload: Any
    nbytes: int
    last_used: float
    namespace: str | None = None


def tensor_bytes(obj: Any) -> int:
    """Exact bytes held by the tensors of a KV cache: ``numel() * element_size()`` over all keys and values.

    Accepts a transformers ``Cache`` (``.layers[i].keys`` / ``.values``; a layer with ``held_bytes()`` counts what
    its preallocated buffers hold, filled or not: that is the memory it keeps alive), a legacy tuple of per-layer
    ``(key, value)`` pairs, or any nesting of lists/tuples/dicts of tensors. Duck-typed, so this module never
    imports torch.
    """
    if obj is None:
        return 0
    if hasattr(obj, "numel") and hasattr(obj, "element_size"):
        return int(obj.numel()) * int(obj.element_size())
    layers = getattr(obj, "layers", None)
    if layers is not None:
        total = 0
        for layer in layers:
            held = getattr(layer, "held_bytes", None)
            if held is not None:  # a preallocated layer: its whole buffers, not only the filled part
                total += int(held())
                continue
            total += tensor_bytes(getattr(layer, "keys", None))
            total += tensor_bytes(getattr(layer, "values", None))
        return total
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


class ConversationCache:
    """Cached per-conversation state under one byte budget, least recently used evicted first.

    The engine's cycle for one turn: ``take(cid)`` removes the conversation's entry (its state is about to be
    extended in place, so it must not count twice or be evicted mid-turn), ``record(hit)`` counts the lookup,
    and ``put(cid, payload, nbytes)`` stores the grown state back, evicting the least recently used others to
    make room. ``release(cid)`` frees a conversation at once (the conversation ended). Entries idle for longer than
    ``idle_ttl_s`` are dropped by whichever call comes next. ``bytes_held`` never exceeds ``budget_bytes``.

    One cache may be shared by several engines (one budget for every model): each passes its ``namespace``
    (the model name) to ``record``/``put``/``stats``/``clear`` and keeps its keys distinct, and ``stats(namespace)``
    gives that model's own counters and bytes. A lock makes it safe to share across engine threads; it is only
    held for the bookkeeping, never for I/O.
    """

    def __init__(
        self,
        *,
        budget_bytes: int,
        idle_ttl_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_evict: Callable[[str, str], None] | None = None,
    ) -> None:
        _check_budget(budget_bytes)
        _check_ttl(idle_ttl_s)
        self._budget = int(budget_bytes)
        self._ttl = idle_ttl_s
        self._clock = clock
        self._on_evict = on_evict
        self._entries: OrderedDict[str, CacheEntry] = OrderedDict()
        self._bytes = 0
        self._counts: dict[str | None, _Counts] = {}
        self._lock = threading.RLock()

    # ----------------------------------------------------------------------------------------------- settings
    @property
    def budget_bytes(self) -> int:
        return self._budget

    @property
    def idle_ttl_s(self) -> float | None:
        return self._ttl

    @property
    def bytes_held(self) -> int:
        return self._bytes

    def set_budget(self, budget_bytes: int, now: float | None = None) -> list[str]:
        """Change the budget; shrinking evicts down to it at once. Returns the evicted conversation ids."""
        _check_budget(budget_bytes)
        with self._lock:
            self._budget = int(budget_bytes)
            return self._evict_to(self._budget, self._now(now))

    def set_idle_ttl(self, idle_ttl_s: float | None, now: float | None = None) -> list[str]:
        _check_ttl(idle_ttl_s)
        with self._lock:
            self._ttl = idle_ttl_s
            return self.expire(now)

    # ----------------------------------------------------------------------------------------------- the cycle
    def __contains__(self, cid: object) -> bool:
        return cid in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def conversations(self, namespace: str | None = None) -> list[str]:
        """Conversation keys, least recently used first (only ``namespace``'s when given)."""
        with self._lock:
            return [k for k, e in self._entries.items() if namespace is None or e.namespace == namespace]

    def peek(self, cid: str) -> CacheEntry | None:
        """The entry without touching recency or counters."""
        return self._entries.get(cid)

    def take(self, cid: str, now: float | None = None) -> Any | None:
        """Remove and return the conversation's payload (None when not cached or expired); counts nothing."""
        with self._lock:
            self.expire(now)
            entry = self._entries.pop(cid, None)
            if entry is None:
                return None
            self._bytes -= entry.nbytes
            return entry.payload

    def get(self, cid: str, now: float | None = None) -> Any | None:
        """The payload, marked most recently used (it stays held); counts nothing."""
        with self._lock:
            now = self._now(now)
            self.expire(now)
            entry = self._entries.get(cid)
            if entry is None:
                return None
            entry.last_used = now
            self._entries.move_to_end(cid)
            return entry.payload

    def record(self, hit: bool, namespace: str | None = None) -> None:
        """Count one lookup as a hit (cached state served part of the prompt) or a miss."""
        with self._lock:
            counts = self._counts_for(namespace)
            if hit:
                counts.hits += 1
            else:
                counts.misses += 1

    def put(self, cid: str, payload: Any, nbytes: int | None = None, now: float | None = None, *,
            namespace: str | None = None) -> bool:
        """Store ``payload`` (size ``nbytes``, counted from its tensors when omitted) as most recently used.

        Evicts least recently used conversations to make room. A state larger than the whole budget is not kept
        (counted as rejected) and False is returned; any previous state of ``cid`` is dropped either way.
        """
        size = tensor_bytes(payload) if nbytes is None else int(nbytes)
        if size < 0:
            raise KvCacheError(f"nbytes must be >= 0, got {size}")
        with self._lock:
            now = self._now(now)
            old = self._entries.pop(cid, None)
            if old is not None:
                self._bytes -= old.nbytes
            self.expire(now)
            if size > self._budget:
                self._counts_for(namespace).rejected += 1
                return False
            self._evict_to(self._budget - size, now)
            self._entries[cid] = CacheEntry(payload, size, now, namespace)
            self._bytes += size
            return True

    def release(self, cid: str) -> bool:
        """Drop a conversation's state at once (the conversation ended); True when something was held."""
        with self._lock:
            entry = self._entries.pop(cid, None)
            if entry is None:
                return False
            self._bytes -= entry.nbytes
            self._counts_for(entry.namespace).releases += 1
            return True

    def clear(self, namespace: str | None = None) -> int:
        """Drop every entry (only ``namespace``'s when given); returns how many."""
        with self._lock:
            gone = [k for k, e in self._entries.items() if namespace is None or e.namespace == namespace]
            for key in gone:
                self._bytes -= self._entries.pop(key).nbytes
            return len(gone)

    def expire(self, now: float | None = None) -> list[str]:
        """Drop conversations idle longer than the TTL; returns their ids."""
        if self._ttl is None or not self._entries:
            return []
        with self._lock:
            now = self._now(now)
            gone = []
            # Entries are in recency order, so the idle ones are all at the front.
            while self._entries:
                cid, entry = next(iter(self._entries.items()))
                if now - entry.last_used < self._ttl:
                    break
                self._entries.popitem(last=False)
                self._bytes -= entry.nbytes
                self._counts_for(entry.namespace).expirations += 1
                gone.append(cid)
                self._notify(cid, "expired")
            return gone

    def stats(self, namespace: str | None = None) -> CacheStats:
        """Counters and bytes of the whole cache, or of one namespace (one model of a shared cache)."""
        with self._lock:
            if namespace is None:
                counts = _Counts()
                for c in self._counts.values():
                    counts.add(c)
                held = [e.nbytes for e in self._entries.values()]
            else:
                counts = self._counts.get(namespace) or _Counts()
                held = [e.nbytes for e in self._entries.values() if e.namespace == namespace]
            return CacheStats(
                hits=counts.hits, misses=counts.misses, evictions=counts.evictions, bytes_held=sum(held),
                entries=len(held), budget_bytes=self._budget, expirations=counts.expirations,
                rejected=counts.rejected, releases=counts.releases,
            )

    # ----------------------------------------------------------------------------------------------- internals
    def _evict_to(self, limit: int, now: float) -> list[str]:
        self.expire(now)
        gone = []
        while self._entries and self._bytes > limit:
            cid, entry = self._entries.popitem(last=False)
            self._bytes -= entry.nbytes
            self._counts_for(entry.namespace).evictions += 1
            gone.append(cid)
            self._notify(cid, "evicted")
        return gone

    def _counts_for(self, namespace: str | None) -> _Counts:
        counts = self._counts.get(namespace)
        if counts is None:
            counts = self._counts[namespace] = _Counts()
        return counts

    def _notify(self, cid: str, why: str) -> None:
        if self._on_evict is not None:
            try:
                self._on_evict(cid, why)
            except Exception:  # a hook must not corrupt the accounting half-way through
                log.exception("kv cache on_evict hook failed")

    def _now(self, now: float | None) -> float:
        return self._clock() if now is None else now

    @classmethod
    def from_options(cls, options: Any, *, clock: Callable[[], float] = time.monotonic) -> ConversationCache | None:
        """Build from a ``kv_cache`` option (``KvCacheConfig.model_dump()`` shape); None when disabled/absent.

        A ``ConversationCache`` passed as the option is returned as is: it is shared (one budget for all models).
        """
        if isinstance(options, ConversationCache):
            return options
        if not options:
            return None
        if not isinstance(options, dict):
            options = dict(options)
        if not options.get("enabled", True):
            return None
        known = {"budget_bytes", "idle_ttl_s"}
        unknown = set(options) - known - {"enabled"}
        if unknown:
            raise KvCacheError(f"unknown kv_cache option(s) {sorted(unknown)}; known: {sorted(known | {'enabled'})}")
        return cls(
            budget_bytes=options.get("budget_bytes", 256 * 1024**2), idle_ttl_s=options.get("idle_ttl_s"),
            clock=clock,
        )


@dataclass(slots=True)
class _Counts:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    expirations: int = 0
    rejected: int = 0
    releases: int = 0

    def add(self, other: _Counts) -> None:
        self.hits += other.hits
        self.misses += other.misses
        self.evictions += other.evictions
        self.expirations += other.expirations
        self.rejected += other.rejected
        self.releases += other.releases


def _check_budget(budget_bytes: Any) -> None:
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes < 0:
        raise KvCacheError(f"budget_bytes must be an integer >= 0, got {budget_bytes!r}")


def _check_ttl(ttl: Any) -> None:
    if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or ttl <= 0):
        raise KvCacheError(f"idle_ttl_s must be a number > 0 (or None for no expiry), got {ttl!r}")
