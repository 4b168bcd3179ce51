"""The model manager's runtime-config diff (pure): every key it applies is seen as changed, and only those."""

from __future__ import annotations

import pytest

from muai.config import ORCHESTRATOR_SECTIONS, apply_update, load_config
from orchestrator.runtime_config import APPLIERS, diff_manager_config

MANAGER_CHANGES = {
    "batching.max_batch_size": 4,
    "batching.min_batch_size": 2,
    "batching.batch_timeout_s": 0.05,
    "batching.adaptive": False,
    "batching.length_bucketing": True,
    "kv_cache.budget_bytes": 2**20,
    "kv_cache.idle_ttl_s": 60.0,
    "models.tiny-llama.inject_delay_s": 0.5,
}


@pytest.mark.parametrize("key", sorted(MANAGER_CHANGES))
def test_each_manager_key_is_seen_changed(key):
    config = load_config(env={})
    new, changed = apply_update(config, {key: MANAGER_CHANGES[key]}, sections=ORCHESTRATOR_SECTIONS)
    diff = diff_manager_config(config, new, config.models)
    assert diff.changed == changed == [key]
    if key.startswith("batching."):
        assert diff.batch_limits == {key.split(".")[1]: MANAGER_CHANGES[key]}
    elif key == "kv_cache.budget_bytes":
        assert diff.kv_budget_bytes == 2**20 and not diff.kv_idle_ttl_changed
    elif key == "kv_cache.idle_ttl_s":
        assert diff.kv_idle_ttl_changed and diff.kv_idle_ttl_s == 60.0 and diff.kv_budget_bytes is None
    else:
        assert diff.inject_delay_s == {"tiny-llama": 0.5}


def test_the_manager_keys_are_the_appliers_that_name_the_manager():
    named = {k for k, how in APPLIERS.items() if how.startswith("ModelManager.apply_config")}
    assert named == {k.replace("models.tiny-llama.", "models[].") for k in MANAGER_CHANGES}


def test_server_keys_are_not_the_managers():
    config = load_config(env={})
    new, _ = apply_update(config, {"server.queue_capacity": 9, "telemetry.tracing.sampling_ratio": 0.5},
                          sections=ORCHESTRATOR_SECTIONS)
    assert diff_manager_config(config, new, config.models).changed == []


def test_restart_only_keys_are_the_unmarked_existing_ones():
    from orchestrator.runtime_config import is_restart_only

    config = load_config(env={})
    assert is_restart_only(config, "server.port") and is_restart_only(config, "models.tiny-llama.path")
    for key in ("batching.max_batch_size", "models.tiny-llama.inject_delay_s", "telemetry.tracing.sampling_ratio"):
        assert not is_restart_only(config, key)
    for unknown in ("", "server.prot", "nope.key", "batching.max_batch_size.deeper"):
        assert not is_restart_only(config, unknown)
