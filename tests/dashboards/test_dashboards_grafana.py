"""The Grafana dashboards: generated, importable, on the datasource variable, and querying series MuAI exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from dashboards_helpers import (
    DASHBOARDS,
    NO_PROMTOOL,
    PROMETHEUS_BUILTINS,
    build,
    exported_series,
    grouped_labels,
    matched_labels,
    metric_names,
    promtool_parse,
)
from support.procs import PROMTOOL

UIDS = {
    "muai-overview.json": "muai-overview",
    "muai-engines.json": "muai-engines",
    "muai-gpu-host.json": "muai-gpu-host",
    "muai-sidecar-alerts.json": "muai-sidecar-alerts",
}
DS_REF = {"type": "prometheus", "uid": "${datasource}"}
GRAFANA_BUILTIN_VARS = {"__rate_interval", "__interval", "__range", "__interval_ms", "__range_s"}
# Labels Prometheus adds to every scraped series (the target's, and prometheus.yml's static labels).
TARGET_LABELS = {"job", "instance", "component"}


def committed() -> dict[str, dict]:
    return {p.name: json.loads(p.read_text(encoding="utf-8")) for p in sorted((DASHBOARDS / "grafana").glob("*.json"))}


def panels(dashboard: dict) -> list[dict]:
    return list(build().iter_panels(dashboard))


def queries(dashboard: dict) -> list[dict]:
    return [p for p in panels(dashboard) if p["type"] != "row"]


def all_exprs() -> list[tuple[str, str, str]]:
    """(file, panel title, expr) of every panel target of every committed dashboard."""
    return [(name, title, expr) for name, d in committed().items() for title, expr in build().iter_exprs(d)]


def test_committed_json_is_exactly_what_the_generator_writes():
    assert build().check() == [], "run: python dashboards/build.py"
    assert set(committed()) == set(build().DASHBOARDS)


def test_generator_writes_into_a_folder_and_check_reports_drift(tmp_path: Path):
    b = build()
    written = b.write(tmp_path)
    assert sorted(p.name for p in written) == sorted(UIDS)
    assert b.check(tmp_path) == []
    (tmp_path / "muai-engines.json").write_text("{}")
    assert b.check(tmp_path) == ["muai-engines.json"]


def test_four_dashboards_with_stable_unique_uids_and_titles():
    boards = committed()
    assert {name: d["uid"] for name, d in boards.items()} == UIDS
    titles = [d["title"] for d in boards.values()]
    assert len(set(titles)) == len(titles)


@pytest.mark.parametrize("name", sorted(UIDS))
def test_dashboard_is_an_importable_model(name: str):
    d = committed()[name]
    assert d["schemaVersion"] >= 39
    assert "id" not in d, "an id would clash on import; Grafana assigns it"
    for key in ("title", "uid", "panels", "templating", "time", "annotations"):
        assert key in d
    ids = [p["id"] for p in panels(d)]
    assert len(set(ids)) == len(ids), "panel ids must be unique"
    # Panels stay on the 24-column grid and never overlap.
    cells: set[tuple[int, int]] = set()
    for p in panels(d):
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24, p["title"]
        area = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not area & cells, f"{p['title']} overlaps another panel"
        cells |= area


@pytest.mark.parametrize("name", sorted(UIDS))
def test_every_panel_and_variable_queries_the_datasource_variable(name: str):
    d = committed()[name]
    variables = d["templating"]["list"]
    ds_vars = [v for v in variables if v["name"] == "datasource"]
    assert len(ds_vars) == 1 and ds_vars[0]["type"] == "datasource" and ds_vars[0]["query"] == "prometheus"
    for v in variables:
        if v["type"] == "query":
            assert v["datasource"] == DS_REF, v["name"]
    assert queries(d)
    for p in queries(d):
        assert p["datasource"] == DS_REF, p["title"]
        assert p["targets"], f"{p['title']} has no query"
        ref_ids = [t["refId"] for t in p["targets"]]
        assert len(set(ref_ids)) == len(ref_ids), p["title"]
        for t in p["targets"]:
            assert t["datasource"] == DS_REF, p["title"]
            assert t.get("expr", "").strip(), f"{p['title']} target {t['refId']} has no expr"


@pytest.mark.parametrize("name", sorted(UIDS))
def test_every_variable_an_expression_uses_is_defined(name: str):
    d = committed()[name]
    defined = {v["name"] for v in d["templating"]["list"]} | GRAFANA_BUILTIN_VARS
    used = set()
    for _, expr in build().iter_exprs(d):
        used |= {a or b for a, b in re.findall(r"\$(?:\{(\w+)[^}]*\}|(\w+))", expr)}
    assert used - defined == set()


def test_every_metric_an_expression_selects_is_exported_by_the_orchestrator_or_the_sidecar():
    exported = exported_series()
    missing = set()
    for name, title, expr in all_exprs():
        for metric in metric_names(expr) - PROMETHEUS_BUILTINS:
            if metric not in exported:
                missing.add(f"{metric} ({name}: {title})")
    for name, d in committed().items():
        for query in build().variable_queries(d):
            metric = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", query).group(1)
            if metric not in exported:
                missing.add(f"{metric} ({name}: variable {query})")
    assert not missing, "not exported:\n" + "\n".join(sorted(missing))


def test_every_label_an_expression_matches_or_groups_by_exists_on_its_metrics():
    """Catches `by (operation)` on a histogram that has no operation label, which would quietly sum everything."""
    exported = exported_series()
    problems = []
    for name, title, expr in all_exprs():
        for metric, labels in matched_labels(expr):
            known = exported.get(metric)
            if known is not None and labels - known - TARGET_LABELS:
                problems.append(f"{name}: {title}: {metric} has no {sorted(labels - known - TARGET_LABELS)}")
        for labels, metrics in grouped_labels(expr):
            for metric in metrics - PROMETHEUS_BUILTINS:
                known = exported.get(metric)
                if known is not None and labels - known - TARGET_LABELS:
                    problems.append(f"{name}: {title}: by {sorted(labels)} but {metric} has only {sorted(known)}")
    for name, d in committed().items():
        for query in build().variable_queries(d):
            metric, label = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", query).groups()
            known = exported.get(metric)
            if known is not None and label not in known | TARGET_LABELS:
                problems.append(f"{name}: variable {query}: {metric} has no {label}")
    assert not problems, "\n".join(problems)


@pytest.mark.skipif(PROMTOOL is None, reason=NO_PROMTOOL)
def test_every_expression_parses_with_prometheus_own_parser(tmp_path: Path):
    b = build()
    exprs = [b.render_expr(expr, values={"window": "1m"}) for _, _, expr in all_exprs()]
    # Variable queries select through label_values(); the selector inside is PromQL too.
    for d in committed().values():
        for query in b.variable_queries(d):
            metric, label = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", query).groups()
            exprs.append(f"count by ({label}) ({metric})")
    result = promtool_parse(exprs, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout


@pytest.mark.skipif(PROMTOOL is None, reason=NO_PROMTOOL)
def test_the_parse_check_rejects_broken_promql(tmp_path: Path):
    result = promtool_parse(["sum by (model) (rate(muai_requests_total[1m])", "up"], tmp_path)
    assert result.returncode != 0
    assert "muai:dashboard_check:0" in result.stdout + result.stderr or "parse error" in result.stdout + result.stderr


def test_render_expr_substitutes_grafana_variables_like_all_does():
    render = build().render_expr
    expr = 'sum(rate(m_total{model=~"$model", window="${window}"}[$__rate_interval]))'
    assert render(expr, values={"window": "5m"}) == 'sum(rate(m_total{model=~".*", window="5m"}[1m]))'
    assert render(expr, rate_interval="10s") == 'sum(rate(m_total{model=~".*", window=".*"}[10s]))'


def test_metric_name_extraction_ignores_functions_labels_and_keywords():
    expr = (
        'histogram_quantile(0.95, sum by (le, model) (rate(a_bucket{model=~"x|y", status!="ok"}[5m])))'
        ' > 2 and on (model) sum by (model) (increase(b_count[1m] offset 5m)) >= 5 or vector(0) * c'
    )
    assert metric_names(expr) == {"a_bucket", "b_count", "c"}
    assert matched_labels(expr) == [("a_bucket", {"model", "status"})]
    assert grouped_labels(expr) == [({"le", "model"}, {"a_bucket"}), ({"model"}, {"b_count"})]


# --- what an operator expects to find ------------------------------------------------------------------------------


def exprs_of(uid_file: str) -> str:
    return "\n".join(expr for _, expr in build().iter_exprs(committed()[uid_file]))


def test_overview_covers_traffic_errors_latency_percentiles_ttft_queue_and_saturation():
    text = exprs_of("muai-overview.json")
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}, sum by (le) (rate(muai_request_latency_seconds_bucket" in text
    for needle in ("muai_requests_total", 'status=~"error|timeout"', "muai_time_to_first_token_seconds_bucket",
                   "muai_requests_waiting", "muai_requests_running", "muai_rejected_requests_total",
                   "muai_request_queue_seconds_bucket"):
        assert needle in text, needle


def test_engines_board_has_per_engine_latency_fallbacks_batching_caches_and_loads():
    d = committed()["muai-engines.json"]
    text = exprs_of("muai-engines.json")
    assert "sum by (model, engine, le) (rate(muai_request_latency_seconds_bucket" in text
    for needle in ("muai_engine_fallbacks_total", "muai_batch_size_bucket", "muai_model_lifecycle_events_total",
                   "muai_model_load_seconds_sum"):
        assert needle in text, needle
    mean_batch = [p for p in queries(d) if p["title"] == "Mean batch size"][0]["targets"][0]["expr"]
    assert mean_batch.index("muai_batch_inference_count_total") < mean_batch.index("/") < mean_batch.index(
        "muai_batch_execution_count_total")
    # KV and vLLM prefix cache hit rates share one panel.
    cache = [p for p in queries(d) if p["title"] == "Cache hit rates"][0]
    cache_exprs = " ".join(t["expr"] for t in cache["targets"])
    assert "muai_kv_cache_hits_total" in cache_exprs and "muai_prefix_cache_queries_total" in cache_exprs


def test_gpu_host_board_has_per_gpu_fields_errors_cpu_and_rss():
    text = exprs_of("muai-gpu-host.json")
    for needle in ("muai_gpu_utilization_ratio", "muai_gpu_framebuffer_used_bytes", "muai_gpu_temperature_celsius",
                   "muai_gpu_power_watts", "muai_gpu_xid_errors_total", "muai_host_cpu_utilization_ratio",
                   "muai_orchestrator_process_resident_memory_bytes", "muai_process_resident_memory_bytes"):
        assert needle in text, needle


def test_sidecar_board_has_ingestion_scores_alerts_and_notifications_by_sink():
    text = exprs_of("muai-sidecar-alerts.json")
    for needle in ("muai_sidecar_spans_received_total", "muai_sidecar_detector_score", "muai_sidecar_alerts_firing",
                   "sum by (sink) (rate(muai_sidecar_notifications_sent_total", "muai_sidecar_notifications_failed_total"):
        assert needle in text, needle
