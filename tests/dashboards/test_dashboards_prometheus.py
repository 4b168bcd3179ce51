"""The example Prometheus config, the alert rules and their unit tests, and the Alertmanager example,
checked by the real promtool, amtool and Alertmanager (Debian packages prometheus and prometheus-alertmanager)."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from dashboards_helpers import (
    DASHBOARDS,
    NO_AMTOOL,
    NO_PROMTOOL,
    PROMETHEUS_BUILTINS,
    exported_series,
    load_yaml,
    metric_names,
    seconds,
)
from support.procs import (
    ALERTMANAGER,
    AMTOOL,
    NO_ALERTMANAGER,
    NO_PROMETHEUS,
    PROMETHEUS,
    PROMTOOL,
    alertmanager_process,
    prometheus_process,
)
from support.waiting import poll

from orchestrator.config import ServerConfig
from sidecar import evaluation
from sidecar.config import DEFAULT_PORT, DetectorsConfig, MonitorConfig

PROM_CONFIG = DASHBOARDS / "prometheus" / "prometheus.yml"
RULES = DASHBOARDS / "prometheus" / "rules" / "muai-alerts.yml"
RULE_TESTS = sorted((DASHBOARDS / "prometheus" / "tests").glob("*.yml"))
AM_CONFIG = DASHBOARDS / "alertmanager" / "alertmanager.yml"

needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason=NO_PROMTOOL)
needs_amtool = pytest.mark.skipif(AMTOOL is None, reason=NO_AMTOOL)


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=60, cwd=DASHBOARDS.parent)


def rules() -> dict[str, dict]:
    return {rule["alert"]: rule for group in load_yaml(RULES)["groups"] for rule in group["rules"]}


# --- Prometheus ---------------------------------------------------------------------------------------------------


@needs_promtool
def test_promtool_accepts_the_scrape_config_and_finds_its_rule_files():
    result = run(PROMTOOL, "check", "config", str(PROM_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "muai-alerts.yml" in result.stdout + result.stderr, "rule_files must reach rules/muai-alerts.yml"


def test_scrape_config_targets_the_processes_default_ports_on_loopback():
    jobs = {job["job_name"]: job for job in load_yaml(PROM_CONFIG)["scrape_configs"]}
    targets = {name: [t for sc in job["static_configs"] for t in sc["targets"]] for name, job in jobs.items()}
    assert targets["muai-orchestrator"] == [f"127.0.0.1:{ServerConfig().port}"]
    assert targets["muai-sidecar"] == [f"127.0.0.1:{DEFAULT_PORT}"]
    assert jobs["muai-orchestrator"].get("metrics_path", "/metrics") == "/metrics"
    assert jobs["muai-sidecar"].get("metrics_path", "/metrics") == "/metrics"


@needs_promtool
def test_promtool_accepts_the_rules():
    result = run(PROMTOOL, "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


@needs_promtool
def test_rule_unit_tests_pass():
    assert RULE_TESTS
    result = run(PROMTOOL, "test", "rules", *map(str, RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_unit_test():
    tested = set()
    for path in RULE_TESTS:
        for case in load_yaml(path)["tests"]:
            tested |= {t["alertname"] for t in case.get("alert_rule_test", []) if t.get("exp_alerts")}
    assert tested == set(rules())


def test_rules_select_only_series_muai_exports():
    exported = exported_series()
    for name, rule in rules().items():
        missing = metric_names(rule["expr"]) - PROMETHEUS_BUILTINS - set(exported)
        assert not missing, f"{name}: {missing}"


def test_every_alert_has_severity_summary_and_description():
    for name, rule in rules().items():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        assert rule["labels"]["source"] == "prometheus", name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name


def comparisons(expr: str) -> list[tuple[str, float]]:
    return [(op, float(v)) for op, v in re.findall(r"(>=|<=|>|<|==)\s*([0-9.]+)", expr)]


def test_rules_mirror_the_sidecar_detectors_names_thresholds_durations_and_severities():
    """The same conditions as the sidecar's defaults; change sidecar/config.py and the rules together."""
    d = DetectorsConfig()
    r = rules()
    # The sidecar judges over one monitor window; the rules' rate() ranges have its length.
    horizon_s = MonitorConfig().windows[d.window]

    lat = r[evaluation.ALERT_LATENCY]
    quantile = {"p50": 0.5, "p95": 0.95, "p99": 0.99}[d.latency.quantile]
    assert f"histogram_quantile({quantile}," in lat["expr"]
    assert comparisons(lat["expr"]) == [(">", d.latency.threshold_s), (">=", d.latency.min_count)]
    assert (seconds(lat["for"]), lat["labels"]["severity"]) == (d.latency.for_s, d.latency.severity)

    err = r[evaluation.ALERT_ERRORS]
    assert comparisons(err["expr"]) == [(">", d.error_rate.threshold), (">=", d.error_rate.min_count)]
    assert (seconds(err["for"]), err["labels"]["severity"]) == (d.error_rate.for_s, d.error_rate.severity)

    for alert, cfg in ((evaluation.ALERT_GPU_MEMORY, d.gpu_memory), (evaluation.ALERT_HOST_MEMORY, d.host_memory)):
        rule = r[alert]
        assert comparisons(rule["expr"]) == [(">", cfg.threshold_percent)], alert
        assert (seconds(rule["for"]), rule["labels"]["severity"]) == (cfg.for_s, cfg.severity), alert

    low = r[evaluation.ALERT_THROUGHPUT]  # the sidecar's floor is unset by default; ours is an example
    # The floor, then the guard that keeps idle series (no request for a long while) from firing.
    assert comparisons(low["expr"])[0][0] == "<"
    assert comparisons(low["expr"])[1:] == [(">", 0.0)]
    assert (seconds(low["for"]), low["labels"]["severity"]) == (d.throughput.for_s, d.throughput.severity)

    for name in (evaluation.ALERT_LATENCY, evaluation.ALERT_ERRORS):
        ranges = set(re.findall(r"\[(\w+)\]", r[name]["expr"]))
        assert {seconds(x) for x in ranges} == {horizon_s}, name
    rate_range, *guard = re.findall(r"\[(\w+)\]", low["expr"])
    assert seconds(rate_range) == horizon_s
    assert [seconds(x) > horizon_s for x in guard] == [True]

    assert r["MuaiTargetDown"]["labels"]["severity"] == "critical"
    assert 'job=~"muai-orchestrator|muai-sidecar"' in r["MuaiTargetDown"]["expr"]


# --- Alertmanager -------------------------------------------------------------------------------------------------


@needs_amtool
def test_amtool_accepts_the_alertmanager_config():
    result = run(AMTOOL, "check-config", str(AM_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@needs_amtool
@pytest.mark.parametrize(
    ("labels", "receiver"),
    [
        (["alertname=HighErrorRate", "severity=critical", "model=m"], "muai-oncall"),
        (["alertname=MuaiTargetDown", "severity=critical"], "muai-oncall"),
        (["alertname=HighRequestLatency", "severity=warning", "model=m"], "muai-team"),
        (["alertname=LatencyAnomaly", "severity=warning", "detector=ewma"], "muai-team"),
        (["alertname=Something", "severity=info"], "muai-null"),
        (["alertname=Unlabelled"], "muai-default"),
    ],
)
def test_alerts_route_by_severity(labels: list[str], receiver: str):
    result = run(AMTOOL, "config", "routes", "test", f"--config.file={AM_CONFIG}", f"--verify.receivers={receiver}", *labels)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == receiver


def test_alertmanager_config_groups_and_inhibits_warning_by_critical():
    config = load_yaml(AM_CONFIG)
    route = config["route"]
    assert "alertname" in route["group_by"] and route["group_wait"] and route["repeat_interval"]
    (rule,) = config["inhibit_rules"]
    assert rule["source_matchers"] == ['severity="critical"'] and rule["target_matchers"] == ['severity="warning"']
    webhooks = [w for r in config["receivers"] for w in r.get("webhook_configs", [])]
    assert webhooks and all(w["url"].startswith("http://127.0.0.1:") and w["send_resolved"] for w in webhooks)


def _http(url: str, body: object | None = None) -> object:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as response:
        raw = response.read()
    return json.loads(raw) if raw else None


@pytest.fixture
def alertmanager(tmp_path: Path) -> Iterator[str]:
    """The real Alertmanager on a free loopback port, running the shipped example config."""
    if ALERTMANAGER is None:
        pytest.skip(NO_ALERTMANAGER)
    with alertmanager_process(AM_CONFIG, tmp_path) as am:
        am.wait_ready(timeout=30.0, interval=0.05)
        yield am.url


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_real_alertmanager_inhibits_a_warning_by_a_critical_on_the_same_series(alertmanager: str):
    def alert(name: str, severity: str, model: str) -> dict:
        labels = {"alertname": name, "severity": severity, "model": model, "operation": "chat"}
        return {"labels": labels, "annotations": {"summary": name}, "generatorURL": "http://127.0.0.1:9464/api/v1/alerts"}

    _http(f"{alertmanager}/api/v2/alerts", [
        alert("HighErrorRate", "critical", "tiny-llama"),
        alert("HighRequestLatency", "warning", "tiny-llama"),
        alert("HighRequestLatency", "warning", "minilm"),
    ])

    def states() -> dict[tuple[str, str], dict] | None:
        got = {(a["labels"]["alertname"], a["labels"]["model"]): a["status"] for a in _http(f"{alertmanager}/api/v2/alerts")}
        return got if len(got) == 3 else None

    got = poll(states, timeout=30.0, interval=0.05, what="the three alerts in Alertmanager")
    assert got[("HighErrorRate", "tiny-llama")]["state"] == "active"
    assert got[("HighRequestLatency", "tiny-llama")]["state"] == "suppressed"
    assert got[("HighRequestLatency", "tiny-llama")]["inhibitedBy"]
    assert got[("HighRequestLatency", "minilm")]["state"] == "active"


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_real_prometheus_starts_on_the_example_config_with_its_rules_and_both_targets(tmp_path: Path):
    if PROMETHEUS is None:
        pytest.skip(NO_PROMETHEUS)
    with prometheus_process(PROM_CONFIG, tmp_path) as prom:
        def rule_names() -> set[str] | None:
            prom.check_alive()
            try:
                groups = _http(f"{prom.url}/api/v1/rules")["data"]["groups"]
            except (urllib.error.URLError, OSError):
                return None
            return {rule["name"] for group in groups for rule in group["rules"]} or None

        loaded = poll(rule_names, timeout=30.0, interval=0.05, what="prometheus to serve its rules",
                      diagnose=prom.describe)
        assert loaded == set(rules())

        def scrape_urls() -> dict[str, str] | None:
            prom.check_alive()
            targets = _http(f"{prom.url}/api/v1/targets")["data"]["activeTargets"]  # filled once discovery ran
            found = {t["labels"]["job"]: t["scrapeUrl"] for t in targets}
            return found if {"muai-orchestrator", "muai-sidecar"} <= set(found) else None

        jobs = poll(scrape_urls, timeout=30.0, interval=0.05, what="prometheus to discover its targets",
                    diagnose=prom.describe)
        assert jobs["muai-orchestrator"] == f"http://127.0.0.1:{ServerConfig().port}/metrics"
        assert jobs["muai-sidecar"] == f"http://127.0.0.1:{DEFAULT_PORT}/metrics"
