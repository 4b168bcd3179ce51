"""The resident-weights budget as a pure planner: which loaded models to unload so that one more fits.

``engines.resident_budget_bytes`` bounds the bytes of weights loaded at once. To load a model past it, the least
recently used models that may be unloaded (neither ``preload`` nor ``required``) go first, oldest first, and no more
of them than needed. When even unloading all of those would not make room, the plan says so, with what is held.
No I/O, no locks: the model manager applies the plan under its own.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Resident:
    """One loaded model as the planner sees it."""

    name: str
    weights_bytes: int
    evictable: bool
    last_used: float


@dataclass(frozen=True, slots=True)
class RoomPlan:
    """Unload ``victims`` (in this order) and the model fits; ``fits`` is False when nothing allowed would do."""

    victims: tuple[str, ...]
    fits: bool
    pinned_bytes: int
    """Bytes held by loaded models that may not be unloaded."""


def plan_room(needed_bytes: int, budget_bytes: int | None, loaded: Iterable[Resident]) -> RoomPlan:
    loaded = list(loaded)
    pinned = sum(r.weights_bytes for r in loaded if not r.evictable)
    if budget_bytes is None:
        return RoomPlan((), True, pinned)
    if pinned + needed_bytes > budget_bytes:
        return RoomPlan((), False, pinned)
    resident = sum(r.weights_bytes for r in loaded)
    victims: list[str] = []
    for r in sorted((r for r in loaded if r.evictable), key=lambda r: r.last_used):
        if resident + needed_bytes <= budget_bytes:
            break
        victims.append(r.name)
        resident -= r.weights_bytes
    return RoomPlan(tuple(victims), resident + needed_bytes <= budget_bytes, pinned)


def describe_held(loaded: Sequence[Resident]) -> str:
    """``name 12.0 MiB, ...`` for the error that says what is short."""
    return ", ".join(f"{r.name} {r.weights_bytes / 2**20:.1f} MiB" for r in loaded) or "none"


__all__ = ["Resident", "RoomPlan", "describe_held", "plan_room"]
