"""Runtime changes of the sidecar's configuration (``PATCH /api/v1/config``): the keys marked runtime in
``sidecar/config.py`` (``json_schema_extra={"runtime": True}``, the one source), validated by the same models the
config loader validates with, bounds and cross-field rules included.

A patch names keys relative to the ``sidecar`` section, nested (``{"detectors": {"latency": {"threshold_s": 1}}}``)
or dotted (``{"detectors.latency.threshold_s": 1}``). Every key is checked before anything changes: one unknown,
restart-only or invalid key refuses the whole patch. :data:`APPLIERS` says what applies each runtime key; a test
checks that every marked key has an entry.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from pydantic import BaseModel, ValidationError

from sidecar.config import SidecarConfig

APPLIERS: Mapping[str, str] = {
    "detectors.": "SidecarState.reconfigure_detectors: the evaluator takes thresholds and for durations in place, "
                  "reads enabled, min_count and window per tick, and rebuilds statistical detectors that changed",
}
"""Key prefix -> what applies a change of the keys under it."""


class SidecarUpdateError(ValueError):
    """A runtime update was refused; ``status`` is 409 for a key that needs a restart, 422 otherwise."""

    def __init__(self, message: str, *, key: str | None = None, status: int = 422) -> None:
        super().__init__(message)
        self.key = key
        self.status = status


def _nested(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _is_runtime(field: Any) -> bool:
    extra = field.json_schema_extra
    return isinstance(extra, Mapping) and bool(extra.get("runtime"))


def runtime_keys(cls: type[BaseModel] = SidecarConfig, prefix: str = "") -> list[str]:
    """Every key marked runtime under ``cls``, dotted."""
    out: list[str] = []
    for name, field in cls.model_fields.items():
        nested = _nested(field.annotation)
        if nested is not None:
            out += runtime_keys(nested, f"{prefix}{name}.")
        elif _is_runtime(field):
            out.append(f"{prefix}{name}")
    return out


def applier_of(key: str) -> str | None:
    return next((how for prefix, how in APPLIERS.items() if key.startswith(prefix)), None)


def _flatten(patch: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    for key, value in patch.items():
        path = (*prefix, *str(key).split("."))
        if isinstance(value, Mapping):
            yield from _flatten(value, path)
        else:
            yield path, value


def apply_patch(config: SidecarConfig, patch: Any) -> tuple[SidecarConfig, list[str]]:
    """The new config and the keys that changed; raises :class:`SidecarUpdateError` and changes nothing when any
    key is unknown, needs a restart or gets an invalid value."""
    if not isinstance(patch, Mapping) or not patch:
        raise SidecarUpdateError("the update must be a non-empty JSON object of keys to change")
    doc = config.model_dump()
    changed: list[str] = []
    for path, value in _flatten(patch):
        dotted = ".".join(path)
        owner: type[BaseModel] | None = SidecarConfig
        target: Any = doc
        for part in path[:-1]:
            field = owner.model_fields.get(part) if owner is not None else None
            owner = _nested(field.annotation) if field is not None else None
            target = target.get(part) if isinstance(target, dict) else None
            if owner is None:
                break
        field = owner.model_fields.get(path[-1]) if owner is not None else None
        if field is None or not isinstance(target, dict) or _nested(field.annotation) is not None:
            raise SidecarUpdateError(f"unknown key {dotted!r}", key=dotted)
        if not _is_runtime(field):
            raise SidecarUpdateError(
                f"{dotted} cannot change at runtime (it needs a restart); runtime keys: "
                + ", ".join(runtime_keys()), key=dotted, status=409)
        if target.get(path[-1]) != value:
            target[path[-1]] = value
            changed.append(dotted)
    try:
        new = SidecarConfig.model_validate(doc)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first.get("loc", ())) or None
        raise SidecarUpdateError(f"{key or 'sidecar'}: {first.get('msg')}", key=key) from None
    return new, changed


__all__ = ["APPLIERS", "SidecarUpdateError", "applier_of", "apply_patch", "runtime_keys"]
