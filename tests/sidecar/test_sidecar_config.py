"""The sidecar's config section: defaults, bounds, unknown keys, runtime markers."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from sidecar.config import DEFAULT_PORT, SidecarConfig


def test_defaults_are_valid_and_listen_on_loopback_9464():
    cfg = SidecarConfig()
    assert cfg.port == DEFAULT_PORT == 9464
    assert cfg.host == "127.0.0.1"
    assert cfg.monitor.windows == {"10s": 10.0, "1m": 60.0, "5m": 300.0}
    assert cfg.forwarding.endpoint is None
    assert cfg.detectors.throughput.threshold_rps is None


def test_unknown_keys_are_refused():
    with pytest.raises(ValidationError, match="extra"):
        SidecarConfig(prot=1)
    with pytest.raises(ValidationError):
        SidecarConfig(receiver={"max_body": 10})


@pytest.mark.parametrize(
    "kwargs",
    [
        {"port": 0},
        {"port": 70000},
        {"receiver": {"max_body_bytes": 10}},
        {"monitor": {"windows": {}}},
        {"monitor": {"windows": {"1m": -1}}},
        {"monitor": {"windows": {"bad name": 10}}},
        {"detectors": {"window": "1h"}},
        {"detectors": {"error_rate": {"threshold": 1.5}}},
        {"alerting": {"rate_limit": {"group_by": ["bad-label"]}}},
        {"alerting": {"rate_limit": {"group_interval_s": 60, "repeat_interval_s": 30}}},
        {"alerting": {"sinks": {"webhook": {"url": "ftp://x"}}}},
    ],
)
def test_bad_values_are_refused(kwargs):
    with pytest.raises(ValidationError):
        SidecarConfig(**kwargs)


def test_frozen():
    cfg = SidecarConfig()
    with pytest.raises(ValidationError):
        cfg.port = 1


def test_every_field_is_documented_and_thresholds_are_runtime():
    def walk(model_cls, prefix=""):
        for name, field in model_cls.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, SidecarConfig.__mro__[1]):
                assert ann.__doc__, f"section {prefix}{name} has no docstring"
                yield from walk(ann, f"{prefix}{name}.")
            else:
                assert field.description, f"{prefix}{name} has no description"
                yield f"{prefix}{name}", (field.json_schema_extra or {}).get("runtime", False)

    fields = dict(walk(SidecarConfig))
    assert fields["detectors.latency.threshold_s"] is True
    assert fields["detectors.error_rate.threshold"] is True
    assert fields["detectors.gpu_memory.threshold_percent"] is True
    assert fields["detectors.throughput.threshold_rps"] is True
    assert fields["port"] is False
    assert fields["receiver.max_body_bytes"] is False


def test_label_forming_keys_are_not_runtime():
    """Labels are part of an alert's fingerprint: changing one while an alert fires would orphan it."""

    def walk(model_cls, prefix=""):
        for name, field in model_cls.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, SidecarConfig.__mro__[1]):
                yield from walk(ann, f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}", name, (field.json_schema_extra or {}).get("runtime", False)

    severities = [(path, runtime) for path, name, runtime in walk(SidecarConfig) if name == "severity"]
    assert len(severities) == 6  # latency, error_rate, gpu_memory, host_memory, throughput, statistical
    assert [path for path, runtime in severities if runtime] == []
    fields = {path: runtime for path, _, runtime in walk(SidecarConfig)}
    assert fields["alerting.external_labels"] is False


def test_detector_defaults_are_quiet_on_noise():
    st = SidecarConfig().detectors.statistical
    assert st.for_s > 0 and st.interval_s >= 10 and st.min_rel_spread >= 0.1
    assert SidecarConfig().forwarding.queue_bytes == 64 * 1024**2


def test_every_runtime_key_of_the_sidecar_has_an_applier():
    # The markers are the one source of what may change while running; one marked with nothing that applies it
    # would be accepted and then silently not take effect.
    from sidecar.runtime_update import applier_of, runtime_keys

    keys = runtime_keys()
    assert "detectors.latency.threshold_s" in keys and "detectors.statistical.ewma.alpha" in keys
    assert [k for k in keys if applier_of(k) is None] == []
    # The sinks' throttles are built at start: their keys take a restart.
    assert [k for k in keys if k.startswith("alerting.")] == []


TOKEN = "sidecar-admin-token-0123456789"


async def test_patch_config_applies_detector_keys_at_runtime(start_sidecar, http):
    from sidecar_helpers import quiet_config

    server, state = await start_sidecar(quiet_config(tuner={"admin_token": TOKEN}))
    url = str(server.make_url("/api/v1/config"))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for headers in ({}, {"Authorization": "Bearer wrong-token-wrong-token"}):
        async with http.patch(url, json={"detectors.latency.threshold_s": 0.5}, headers=headers) as resp:
            assert resp.status == 401
    patch = {"detectors": {"latency": {"threshold_s": 0.5}, "error_rate": {"for_s": 5}}}
    async with http.patch(url, json=patch, headers=auth) as resp:
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["changed"] == ["detectors.latency.threshold_s", "detectors.error_rate.for_s"]
    assert state.config.detectors.latency.threshold_s == 0.5
    assert state.evaluator.config.latency.threshold_s == 0.5 and state.evaluator.config.error_rate.for_s == 5
    # Restart-only keys are 409, bad values and unknown keys 422; either way nothing changes.
    for body, status, key in (({"port": 1234, "detectors.latency.for_s": 1}, 409, "port"),
                              ({"alerting.rate_limit.burst": 3}, 409, "alerting.rate_limit.burst"),
                              ({"detectors.latency.threshold_s": -1}, 422, "detectors.latency.threshold_s"),
                              ({"detectors.window": "7m"}, 422, None),
                              ({"detectors.latency.treshold_s": 1}, 422, "detectors.latency.treshold_s")):
        async with http.patch(url, json=body, headers=auth) as resp:
            assert resp.status == status, (body, await resp.text())
            error = (await resp.json())["error"]
            assert error["code"] == status and (key is None or error["key"] == key)
    assert state.config.detectors.latency.for_s == quiet_config().detectors.latency.for_s
    assert state.config.detectors.latency.threshold_s == 0.5


async def test_patch_config_is_off_without_an_admin_token(start_sidecar, http):
    server, state = await start_sidecar()
    async with http.patch(str(server.make_url("/api/v1/config")), json={"detectors.latency.threshold_s": 1},
                          headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
        assert resp.status == 404
