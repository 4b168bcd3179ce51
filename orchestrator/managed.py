"""A registered model as the manager keeps it (:class:`ManagedModel`), its lifecycle states and events, and the size
of its weights that the resident budget measures."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from adapters.base import ModelSpec
from orchestrator.batcher import Batcher
from orchestrator.config import ModelConfig
from orchestrator.errors import MuaiError

ModelState = Literal["unloaded", "loading", "ready", "failed"]
"""A model's lifecycle state. ``status()`` also reports ``unavailable``: ready, but no engine serves it now."""
EventKind = Literal["load_start", "load_ok", "load_fail", "unload", "fallback"]


class ModelConfigError(MuaiError, ValueError):
    """A model cannot be registered (a name clash with a loaded model, a malformed config)."""


@dataclass(frozen=True, slots=True)
class ModelEvent:
    """One lifecycle event of a model, for metrics, logs and spans."""

    kind: EventKind
    model: str
    engine: str | None = None
    duration_s: float | None = None
    error: str | None = None
    detail: Any = None
    """The ``FallbackEvent`` for ``fallback``."""


@dataclass(eq=False)
class ManagedModel:
    """A registered model: its config, its state and, once loaded, the fallback chain that serves it."""

    config: ModelConfig
    state: ModelState = "unloaded"
    error: str | None = None
    spec: ModelSpec | None = None
    chain: Any = None
    batcher: Batcher | None = None
    load_duration_s: float | None = None
    preference: tuple[str, ...] = ()
    weights_bytes: int = 0
    last_used: float = 0.0
    evicted: bool = False
    """Unloaded to make room under ``engines.resident_budget_bytes``: the next request loads it again."""
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def evictable(self) -> bool:
        return not (self.config.preload or self.config.required)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def task(self) -> str:
        return self.config.task

    @property
    def engine_name(self) -> str | None:
        return self.chain.engine_name if self.chain is not None else None

    @property
    def engine(self) -> Any:
        """The engine serving now (changes on fallback)."""
        return self.chain.active_engine if self.chain is not None else None

    @property
    def loaded(self) -> bool:
        return self.state == "ready"


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".onnx", ".gguf")


def weights_bytes(path: str) -> int:
    """Size of a model directory's weight files: the resident budget's measure, known before loading."""
    root = Path(path)
    if root.is_file():
        return root.stat().st_size
    try:
        return sum(f.stat().st_size for f in root.rglob("*") if f.is_file() and f.name.endswith(_WEIGHT_SUFFIXES))
    except OSError:
        return 0


__all__ = ["EventKind", "ManagedModel", "ModelConfigError", "ModelEvent", "ModelState", "weights_bytes"]
