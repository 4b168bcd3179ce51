"""Runtime configuration changes in the orchestrator: what applies each key marked runtime, and the pure diff the
model manager applies.

The markers (``json_schema_extra={"runtime": True}`` on the fields of ``orchestrator/config.py``) are the one source
of which keys may change while serving: ``muai.config.apply_update`` refuses every other key, and the admin API
answers 409 for them. :data:`APPLIERS` says, per marked key, what makes a change take effect; a test checks that
every marked key has an entry, so a key cannot be marked runtime without something that applies it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

BATCH_LIMIT_KEYS = ("max_batch_size", "min_batch_size", "batch_timeout_s", "adaptive", "length_bucketing")

APPLIERS: Mapping[str, str] = {
    **{f"batching.{k}": "ModelManager.apply_config: each model's Batcher.set_limits" for k in BATCH_LIMIT_KEYS},
    "kv_cache.budget_bytes": "ModelManager.apply_config: the shared ConversationCache.set_budget (else each engine)",
    "kv_cache.idle_ttl_s": "ModelManager.apply_config: the shared ConversationCache.set_idle_ttl",
    "models[].inject_delay_s": "ModelManager.apply_config: the model's chain (or engine) reconfigure",
    "server.queue_capacity": "admin API: the admission queue's capacity, then a kick for those waiting",
    "server.max_running_per_model": "read per request by orchestrator.state.running_limit",
    "server.max_queue_wait_s": "read per admission by the AdmissionQueue (orchestrator.server)",
    "server.request_timeout_s": "read per request by the request frame",
    "server.stuck_after_s": "read per readiness probe",
    "telemetry.tracing.sampling_ratio": "admin API: Tracing.set_sampling_ratio",
}
"""Every runtime key of the orchestrator -> what applies a change of it (list items as ``models[].key``)."""


@dataclass(frozen=True, slots=True)
class ManagerChanges:
    """What the model manager has to do for one config change; ``changed`` names the keys, as the admin API says."""

    changed: list[str] = field(default_factory=list)
    batch_limits: dict[str, Any] = field(default_factory=dict)
    kv_budget_bytes: int | None = None
    kv_idle_ttl_s: float | None = None
    kv_idle_ttl_changed: bool = False
    inject_delay_s: dict[str, float] = field(default_factory=dict)
    """model name -> its new ``inject_delay_s``."""


def diff_manager_config(old: Any, new: Any, models: Iterable[Any]) -> ManagerChanges:
    """The manager's part of a change from ``old`` to ``new`` for the registered ``models`` (their configs). Pure."""
    ob, nb = old.batching, new.batching
    limits = {k: getattr(nb, k) for k in BATCH_LIMIT_KEYS if getattr(ob, k) != getattr(nb, k)}
    changed = [f"batching.{k}" for k in limits]
    budget = None
    if old.kv_cache.budget_bytes != new.kv_cache.budget_bytes:
        changed.append("kv_cache.budget_bytes")
        budget = new.kv_cache.budget_bytes
    ttl_changed = old.kv_cache.idle_ttl_s != new.kv_cache.idle_ttl_s
    if ttl_changed:
        changed.append("kv_cache.idle_ttl_s")
    new_models = {mc.name: mc for mc in new.models}
    delays: dict[str, float] = {}
    for current in models:
        mc = new_models.get(current.name)
        if mc is not None and mc.inject_delay_s != current.inject_delay_s:
            delays[current.name] = mc.inject_delay_s
            changed.append(f"models.{current.name}.inject_delay_s")
    return ManagerChanges(changed, limits, budget, new.kv_cache.idle_ttl_s, ttl_changed, delays)


def is_runtime_field(info: Any) -> bool:
    """Whether a config field carries the ``runtime`` marker."""
    extra = getattr(info, "json_schema_extra", None)
    return isinstance(extra, Mapping) and bool(extra.get("runtime"))


def is_restart_only(config: Any, key: str) -> bool:
    """True when ``key`` (dotted; per-model keys as ``models.<name>.<key>``) names an existing key of ``config``
    that is not marked runtime: the admin API answers 409 for it rather than 422."""
    if not key:
        return False
    path = key.split(".")
    owner: Any = type(config)
    if path[0] == "models" and len(path) == 3 and config.models:
        owner, path = type(config.models[0]), path[2:]
    for part in path[:-1]:
        info = getattr(owner, "model_fields", {}).get(part)
        if info is None or not (isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel)):
            return False
        owner = info.annotation
    info = getattr(owner, "model_fields", {}).get(path[-1])
    return info is not None and not is_runtime_field(info)


__all__ = ["APPLIERS", "BATCH_LIMIT_KEYS", "ManagerChanges", "diff_manager_config", "is_restart_only",
           "is_runtime_field"]
