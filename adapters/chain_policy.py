"""The fallback chain's state machine and back-off, as a pure core: synchronous, takes ``now``, does no I/O.

Each engine of a model's preference is in one state:

- ``untried``: not probed yet; ``disabled``: off in its settings (skipped silently, never retried);
- ``active``: serving; ``standby``: works, but a more preferred engine serves (or the chain is closed);
- ``unavailable``: not installed, no hardware, or refusing this model's settings; ``failed``: failed to load or at
  inference. Both back off: the ``n``-th failure in a row makes it sit out ``min(reprobe_after_s * 2**(n-1),
  max_backoff_s)``, after which activation (when nothing serves) or a re-probe (when a less preferred engine serves)
  tries it again. Serving again resets the count.

The shell (``adapters.fallback.FallbackChain``) owns the engines, their loading and the requests in flight; it
holds its lock around every call here and reads the answers. The fallback count lives here too, so it changes
together with the transitions it counts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ChainPolicy", "EngineSnapshot", "EngineState"]


@dataclass(slots=True)
class EngineState:
    name: str
    settings: dict[str, Any] = field(default_factory=dict)
    state: str = "untried"  # untried | active | standby | unavailable | failed | disabled
    available: bool | None = None
    reason: str = ""
    failures: int = 0
    retry_at: float | None = None

    @property
    def sitting_out(self) -> bool:
        return self.state in ("unavailable", "failed")


@dataclass(frozen=True, slots=True)
class EngineSnapshot:
    """One engine of a chain at one instant, as status readers see it (``EngineState`` is the policy's own,
    mutable record)."""

    state: str
    available: bool | None
    reason: str
    failures: int
    retry_in_s: float | None
    """Seconds until its back-off ends and it is tried again; None when it is not backing off."""

    def as_dict(self) -> dict[str, Any]:
        return {"state": self.state, "available": self.available, "reason": self.reason,
                "failures": self.failures, "retry_in_s": self.retry_in_s}


class ChainPolicy:
    """Which engine of an ordered preference should serve, and when a failed one is tried again."""

    def __init__(self, names: Sequence[str], settings: Mapping[str, Mapping[str, Any]] | None = None, *,
                 reprobe_after_s: float, max_backoff_s: float) -> None:
        if reprobe_after_s <= 0 or max_backoff_s < reprobe_after_s:
            raise ValueError(
                f"reprobe_after_s must be > 0 and <= max_backoff_s, got {reprobe_after_s} / {max_backoff_s}")
        settings = settings or {}
        self.engines = [EngineState(n, dict(settings.get(n) or {})) for n in names]
        self.reprobe_after_s = float(reprobe_after_s)
        self.max_backoff_s = float(max_backoff_s)
        self.active: int | None = None
        self.fallbacks = 0
        """Fallback events so far (a more preferred engine taking the model back is not one)."""

    # ---------------------------------------------------------------------------------------- queries
    def enabled(self, index: int) -> bool:
        return bool(self.engines[index].settings.get("enabled", True))

    def candidates(self, now: float) -> list[int]:
        """Engines to try, in order, when nothing serves: not disabled and not backing off."""
        return [i for i, st in enumerate(self.engines)
                if st.state != "disabled" and (st.retry_at is None or st.retry_at <= now)]

    def reprobe_candidates(self, now: float) -> list[int]:
        """More preferred engines than the active one whose back-off is over."""
        upto = self.active if self.active is not None else len(self.engines)
        return [i for i, st in enumerate(self.engines[:upto])
                if st.sitting_out and st.retry_at is not None and st.retry_at <= now]

    def reprobe_due(self, now: float) -> bool:
        return bool(self.reprobe_candidates(now))

    def degraded_reasons(self, model: str, *, serving: bool, closed: bool) -> list[str]:
        """The more preferred engines that are not serving and why; plus "nothing serves" when nothing does."""
        upto = self.active if self.active is not None else len(self.engines)
        out = [f"{st.name} {st.state}: {st.reason}" for st in self.engines[:upto] if st.sitting_out]
        if not serving and not closed:
            out.append(self.nothing_serves_message(model))
        return out

    def nothing_serves_message(self, model: str) -> str:
        parts = [f"{st.name}: {st.reason or st.state}" for st in self.engines]
        return f"no engine can serve model {model!r} ({'; '.join(parts)})"

    def snapshot(self, now: float) -> dict[str, EngineSnapshot]:
        return {
            st.name: EngineSnapshot(st.state, st.available, st.reason, st.failures,
                                    max(0.0, st.retry_at - now) if st.retry_at is not None else None)
            for st in self.engines
        }

    # ---------------------------------------------------------------------------------------- transitions
    def disable(self, index: int) -> None:
        st = self.engines[index]
        st.state, st.available, st.reason = "disabled", False, "disabled by config"

    def probed(self, index: int, available: bool, reason: str = "") -> None:
        st = self.engines[index]
        st.available, st.reason = available, reason

    def mark(self, index: int, state: str, detail: str, now: float) -> float:
        """The engine is unavailable or failed: note why and start its back-off; returns the back-off."""
        st = self.engines[index]
        st.state, st.reason = state, detail
        st.failures += 1
        backoff = min(self.reprobe_after_s * 2 ** (st.failures - 1), self.max_backoff_s)
        st.retry_at = now + backoff
        if self.active == index:
            self.active = None
        return backoff

    def install(self, index: int) -> int | None:
        """``index`` serves now; returns the engine it replaces (put on standby), if any."""
        previous = self.active
        st = self.engines[index]
        st.state, st.available, st.reason, st.failures, st.retry_at = "active", True, "", 0, None
        self.active = index
        if previous is not None and previous != index:
            self.engines[previous].state = "standby"
            return previous
        return None

    def stand_down(self) -> None:
        """Nothing serves any more (the chain closed): the active engine goes on standby."""
        for st in self.engines:
            if st.state == "active":
                st.state = "standby"
        self.active = None

    def count_fallbacks(self, n: int) -> None:
        self.fallbacks += n
