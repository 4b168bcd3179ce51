#!/usr/bin/env python3
"""Builds MuAI's Grafana dashboards (``dashboards/grafana/*.json``) with Grafana's typed builders.

    python dashboards/build.py           # (re)write the JSON files
    python dashboards/build.py --check   # exit 1 when a committed file differs from what this script builds

The panels, variables and dashboards are ``grafana-foundation-sdk`` builders (Grafana's own generated model of a
dashboard, in the ``test`` extra), serialised with its encoder, so a misspelt option or a value of the wrong type fails
here rather than in Grafana. Every panel reads the ``datasource`` template variable (a Prometheus data source picked
at import time), so one file works against any Prometheus. The uids are fixed: links and bookmarks survive re-imports.

Which process exports what (see docs/deployment.md): ``muai_request_*``, ``muai_requests_*``, ``muai_batch_*``,
``muai_kv_cache_*``, ``muai_prefix_cache_*``, ``muai_model_*``, ``muai_process_*`` and ``muai_gpu_memory_*`` come
from the orchestrator (``orchestrator/metrics.py``); ``muai_sidecar_*``, the DCGM-style ``muai_gpu_*`` gauges,
``muai_host_*`` and ``muai_orchestrator_process_*`` from the sidecar (``sidecar/metrics.py``).

Other code (the tests, the end-to-end check) imports this file by path and uses :func:`build_all`,
:func:`iter_exprs`, :func:`variable_queries` and :func:`render_expr`.

Why one file of about 780 lines: it is the four dashboards' source, panel by panel, and the thresholds drawn on them
sit beside the rules they mirror; split by dashboard, the shared panel builders and thresholds would move to a
module of their own that every dashboard imports anyway.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

try:
    from grafana_foundation_sdk.builders import common as common_builders
    from grafana_foundation_sdk.builders import dashboard as dashboard_builders
    from grafana_foundation_sdk.builders import heatmap as heatmap_builders
    from grafana_foundation_sdk.builders import prometheus as prometheus_builders
    from grafana_foundation_sdk.builders import stat as stat_builders
    from grafana_foundation_sdk.builders import table as table_builders
    from grafana_foundation_sdk.builders import timeseries as timeseries_builders
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models import common
    from grafana_foundation_sdk.models import dashboard as model
    from grafana_foundation_sdk.models import heatmap as heatmap_model
    from grafana_foundation_sdk.models import prometheus as prometheus_model
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "dashboards/build.py needs grafana-foundation-sdk, in the test extra: pip install -e '.[test]'"
    ) from exc

OUT_DIR = Path(__file__).resolve().parent / "grafana"
# The SDK's model defaults to schema 36; the panels here are written in the shape of 39 (legend.showLegend, the
# table's cellHeight), and declaring it keeps Grafana from running older migrations over them on import.
SCHEMA_VERSION = 39
TAGS = ["muai"]
DS = model.DataSourceRef(type_val="prometheus", uid="${datasource}")

# The thresholds drawn on panels are the sidecar's detector defaults (sidecar/config.py) and the
# Prometheus rules' (prometheus/rules/muai-alerts.yml), so a line on a graph means "an alert would fire here".
LATENCY_P95_THRESHOLD_S = 2.0
ERROR_RATIO_THRESHOLD = 0.05
MEMORY_THRESHOLD_RATIO = 0.95

# Statuses of muai_requests_total that count as failures; "cancelled" is the client's choice, not ours.
ERROR_STATUSES = "error|timeout"

RI = "$__rate_interval"

Panel = timeseries_builders.Panel | stat_builders.Panel | table_builders.Panel | heatmap_builders.Panel


# --- panels ----------------------------------------------------------------------------------------------------


class Query(NamedTuple):
    """One PromQL query of a panel, with its legend."""

    expr: str
    legend: str = ""


def target(expr: str, legend: str = "") -> Query:
    return Query(expr, legend)


def _dataqueries(
    queries: list[Query], *, fmt: prometheus_model.PromQueryFormat | None = None, instant: bool = False
) -> list[prometheus_builders.Dataquery]:
    """The panel's Prometheus queries, lettered A, B, ... in order."""
    out = []
    for i, query in enumerate(queries):
        dq = prometheus_builders.Dataquery().datasource(DS).expr(query.expr).legend_format(query.legend)
        dq = dq.ref_id(chr(ord("A") + i))
        dq = dq.instant() if instant else dq.range()
        if fmt is not None:
            dq = dq.format(fmt)
        out.append(dq)
    return out


def _thresholds(*steps: tuple[str, float | None]) -> dashboard_builders.ThresholdsConfig:
    return (
        dashboard_builders.ThresholdsConfig()
        .mode(model.ThresholdsMode.ABSOLUTE)
        .steps([model.Threshold(value=value, color=color) for color, value in steps])
    )


def _common(panel: Panel, title: str, description: str) -> Panel:
    panel = panel.title(title).datasource(DS)
    return panel.description(description) if description else panel


def timeseries(
    title: str,
    *targets: Query,
    unit: str = "short",
    description: str = "",
    threshold: float | None = None,
    stack: bool = False,
    bars: bool = False,
    min_: float | None = 0,
    max_: float | None = None,
) -> timeseries_builders.Panel:
    """A time series panel; ``threshold`` draws a red line (and area above it)."""
    steps = [("green", None)] if threshold is None else [("transparent", None), ("red", threshold)]
    panel = (
        _common(timeseries_builders.Panel(), title, description)
        .targets(_dataqueries(list(targets)))
        .unit(unit)
        .color_scheme(dashboard_builders.FieldColor().mode(model.FieldColorModeId.PALETTE_CLASSIC))
        .thresholds(_thresholds(*steps))
        .draw_style(common.GraphDrawStyle.BARS if bars else common.GraphDrawStyle.LINE)
        .line_width(1)
        .fill_opacity(80 if bars else 10)
        .show_points(common.VisibilityMode.NEVER)
        .span_nulls(False)
        .stacking(
            common_builders.StackingConfig()
            .mode(common.StackingMode.NORMAL if stack else common.StackingMode.NONE)
            .group("A")
        )
        .thresholds_style(
            common_builders.GraphThresholdsStyleConfig().mode(
                common.GraphTresholdsStyleMode.OFF if threshold is None else common.GraphTresholdsStyleMode.LINE_AND_AREA
            )
        )
        .legend(
            common_builders.VizLegendOptions()
            .display_mode(common.LegendDisplayMode.LIST)
            .placement(common.LegendPlacement.BOTTOM)
            .show_legend(True)
            .calcs([])
        )
        .tooltip(common_builders.VizTooltipOptions().mode(common.TooltipDisplayMode.MULTI).sort(common.SortOrder.DESCENDING))
    )
    if min_ is not None:
        panel = panel.min(min_)
    if max_ is not None:
        panel = panel.max(max_)
    return panel


def stat(title: str, tgt: Query, *, unit: str = "short", description: str = "", red_above: float | None = None) -> stat_builders.Panel:
    """A single-number panel (last value), red above ``red_above``."""
    steps = [("green", None)] if red_above is None else [("green", None), ("red", red_above)]
    return (
        _common(stat_builders.Panel(), title, description)
        .targets(_dataqueries([tgt]))
        .unit(unit)
        .color_scheme(dashboard_builders.FieldColor().mode(model.FieldColorModeId.THRESHOLDS))
        .thresholds(_thresholds(*steps))
        .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]).fields("").values(False))
        .color_mode(common.BigValueColorMode.VALUE)
        .graph_mode(common.BigValueGraphMode.AREA)
        .justify_mode(common.BigValueJustifyMode.AUTO)
        .orientation(common.VizOrientation.AUTO)
        .text_mode(common.BigValueTextMode.AUTO)
    )


def table(title: str, tgt: Query, *, description: str = "") -> table_builders.Panel:
    """An instant-query table (one row per series)."""
    return (
        _common(table_builders.Panel(), title, description)
        .targets(_dataqueries([tgt], fmt=prometheus_model.PromQueryFormat.TABLE, instant=True))
        .unit("short")
        .show_header(True)
        .cell_height(common.TableCellHeight.SM)
        .with_transformation(
            model.DataTransformerConfig(
                id_val="organize",
                options={"excludeByName": {"Time": True, "__name__": True}, "renameByName": {}},
            )
        )
    )


def heatmap(title: str, tgt: Query, *, unit: str = "short", description: str = "") -> heatmap_builders.Panel:
    """A heatmap of histogram buckets, as Prometheus stores them (no re-bucketing in Grafana)."""
    return (
        _common(heatmap_builders.Panel(), title, description)
        .targets(_dataqueries([tgt], fmt=prometheus_model.PromQueryFormat.HEATMAP))
        .calculate(False)
        .cell_gap(1)
        .color(
            heatmap_builders.HeatmapColorOptions()
            .mode(heatmap_model.HeatmapColorMode.SCHEME)
            .scheme("Oranges")
            .steps(64)
            .exponent(0.5)
            .fill("dark-orange")
        )
        .y_axis(heatmap_builders.YAxisConfig().axis_placement(common.AxisPlacement.LEFT).unit(unit))
        .show_tooltip()
        .show_y_histogram()
        .show_legend()
    )


# --- template variables --------------------------------------------------------------------------------------


def datasource_variable() -> dashboard_builders.DatasourceVariable:
    return (
        dashboard_builders.DatasourceVariable("datasource")
        .id("datasource")
        .label("Data source")
        .type("prometheus")
        .hide(model.VariableHide.DONT_HIDE)
        .regex("")
        .multi(False)
        .include_all(False)
    )


def query_variable(name: str, label: str, query: str, *, multi: bool = True) -> dashboard_builders.QueryVariable:
    """A variable filled from ``label_values(...)``; multi-valued ones default to All (regex ``.*``)."""
    var = (
        dashboard_builders.QueryVariable(name)
        # The SDK's default id is one all-zero UUID shared by every variable; the name is unique.
        .id(name)
        .label(label)
        .datasource(DS)
        .query({"query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"})
        .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(model.VariableSort.ALPHABETICAL_ASC)
        .regex("")
        .hide(model.VariableHide.DONT_HIDE)
        .multi(multi)
        .include_all(multi)
        .options([])
    )
    if multi:
        var = var.all_value(".*").current(model.VariableOption(selected=True, text=["All"], value=["$__all"]))
    return var


# --- layout --------------------------------------------------------------------------------------------------


class Board:
    """Lays panels out left to right on Grafana's 24-column grid, a new line when the next one does not fit.

    Every position is set here rather than by the SDK's ``with_panel``, which only wraps after a line is full and so
    lets a panel that does not fit run past column 24.
    """

    def __init__(self, uid: str, title: str, description: str, variables: list[dashboard_builders.QueryVariable]) -> None:
        self._builder = (
            dashboard_builders.Dashboard(title)
            .uid(uid)
            .description(description)
            .tags(TAGS)
            .editable()
            .tooltip(model.DashboardCursorSync.CROSSHAIR)
            .version(1)
            .refresh("30s")
            .time("now-1h", "now")
            .timezone("browser")
            .fiscal_year_start_month(0)
            .live_now(False)
            .week_start("")
            # Grafana adds its built-in "Annotations & Alerts" query on load; the SDK's model has no builtIn flag to
            # declare it with, and a second, non-built-in copy would show twice.
            .annotations([])
            .link(
                dashboard_builders.DashboardLink("MuAI dashboards")
                .type(model.DashboardLinkType.DASHBOARDS)
                .tags(TAGS)
                .as_dropdown(True)
                .include_vars(False)
                .keep_time(True)
                .target_blank(False)
                .icon("external link")
                .tooltip("")
                .url("")
            )
            .variables([datasource_variable(), *variables])
        )
        self._ids = 0
        self._x = self._y = self._line_h = 0

    def _next_id(self) -> int:
        self._ids += 1
        return self._ids

    def _newline(self) -> None:
        if self._x:
            self._y += self._line_h
            self._x = self._line_h = 0

    def row(self, title: str) -> None:
        self._newline()
        row = (
            dashboard_builders.Row(title)
            .id(self._next_id())
            .collapsed(False)
            .grid_pos(model.GridPos(h=1, w=24, x=0, y=self._y))
        )
        self._builder.with_row(row)
        self._y += 1

    def add(self, panel: Panel, *, w: int = 12, h: int = 8) -> None:
        if self._x + w > 24:
            self._newline()
        self._builder.with_panel(panel.id(self._next_id()).grid_pos(model.GridPos(h=h, w=w, x=self._x, y=self._y)))
        self._x += w
        self._line_h = max(self._line_h, h)

    def render(self) -> dict:
        board = self._builder.build()
        board.schema_version = SCHEMA_VERSION
        return json.loads(json.dumps(board, cls=JSONEncoder))


# --- PromQL helpers ------------------------------------------------------------------------------------------


def rate(metric: str, selector: str = "", window: str = RI) -> str:
    matchers = f"{{{selector}}}" if selector else ""
    return f"rate({metric}{matchers}[{window}])"


def quantile(q: float, histogram: str, selector: str = "", by: str = "") -> str:
    """``histogram_quantile`` over a histogram's buckets, aggregated ``by`` the given labels (and le)."""
    labels = f"{by}, le" if by else "le"
    return f"histogram_quantile({q}, sum by ({labels}) ({rate(histogram + '_bucket', selector)}))"


def ratio_or_zero(num: str, den: str, by: str) -> str:
    """num/den by labels, 0 (not "no data") where the numerator has no series yet: no errors is a value too."""
    agg = f"sum by ({by})" if by else "sum"
    return f"({agg} ({num}) or ({agg} ({den}) * 0)) / {agg} ({den})"


def percentiles(title: str, histogram: str, selector: str, *, description: str = "", threshold: float | None = None) -> timeseries_builders.Panel:
    """p50, p95 and p99 of a histogram on one panel."""
    return timeseries(
        title,
        *(target(quantile(q, histogram, selector), f"p{round(q * 100)}") for q in (0.5, 0.95, 0.99)),
        unit="s",
        description=description,
        threshold=threshold,
    )


# --- the dashboards ------------------------------------------------------------------------------------------

M = 'model=~"$model"'
ME = 'model=~"$model", engine=~"$engine"'


def overview() -> dict:
    b = Board(
        "muai-overview",
        "MuAI / Service overview",
        "Traffic, errors, latency and saturation of the orchestrator, from its /metrics.",
        [query_variable("model", "Model", "label_values(muai_requests_total, model)")],
    )
    requests = rate("muai_requests_total", M)
    errors = rate("muai_requests_total", f'{M}, status=~"{ERROR_STATUSES}"')

    b.row("At a glance")
    b.add(stat("Requests/s", target(f"sum({requests})"), unit="reqps"), w=6, h=4)
    b.add(stat("Error ratio", target(ratio_or_zero(errors, requests, "")), unit="percentunit",
               red_above=ERROR_RATIO_THRESHOLD, description="Requests that ended in error or timeout."), w=6, h=4)
    b.add(stat("p95 latency", target(quantile(0.95, "muai_request_latency_seconds", M)), unit="s",
               red_above=LATENCY_P95_THRESHOLD_S), w=6, h=4)
    b.add(stat("Models loaded", target(f"sum(muai_model_loaded{{{M}}})")), w=6, h=4)

    b.row("Traffic and errors")
    b.add(timeseries("Requests/s by model and operation",
                     target(f"sum by (model, operation) ({requests})", "{{model}} {{operation}}"), unit="reqps"))
    b.add(timeseries("Requests/s by status", target(f"sum by (status) ({requests})", "{{status}}"), unit="reqps", stack=True))
    b.add(timeseries("Error ratio by model and operation",
                     target(ratio_or_zero(errors, requests, "model, operation"), "{{model}} {{operation}}"),
                     unit="percentunit", threshold=ERROR_RATIO_THRESHOLD,
                     description="error and timeout over all finished requests; the line is the alert threshold."))
    b.add(timeseries("Tokens/s",
                     target(f'sum by (model) ({rate("muai_prompt_tokens_total", M)})', "prompt {{model}}"),
                     target(f'sum by (model) ({rate("muai_generation_tokens_total", M)})', "generated {{model}}")))

    b.row("Latency")
    b.add(percentiles("End-to-end latency", "muai_request_latency_seconds", M, threshold=LATENCY_P95_THRESHOLD_S,
                      description="Admission to last byte. The line is the p95 alert threshold."))
    b.add(percentiles("Time to first token", "muai_time_to_first_token_seconds", M,
                      description="Streamed requests only: a non-streamed request has no first token to time."))
    b.add(percentiles("Time per output token", "muai_time_per_output_token_seconds", M))
    b.add(percentiles("Queue wait", "muai_request_queue_seconds", M, description="Admission until a running slot."))

    b.row("Queue and saturation")
    b.add(timeseries("Queue depth",
                     target(f"sum by (model) (muai_requests_waiting{{{M}}})", "waiting {{model}}"),
                     target(f"sum by (model) (muai_requests_running{{{M}}})", "running {{model}}"),
                     description="Admitted requests waiting for a slot, and those inside the engines."))
    b.add(timeseries("Rejected requests/s by reason",
                     target(f'sum by (reason) ({rate("muai_rejected_requests_total")})', "{{reason}}"),
                     unit="reqps", stack=True,
                     description="queue_full and draining mean saturation; the others are bad requests."))
    b.add(timeseries("Orchestrator CPU",
                     target(f'rate(muai_process_cpu_seconds_total[{RI}])', "cores busy"), unit="short",
                     description="CPU cores the orchestrator process keeps busy."))
    b.add(timeseries("GPU utilisation", target("avg(muai_gpu_utilization_ratio)", "mean over GPUs"),
                     target("max(muai_gpu_utilization_ratio)", "busiest GPU"),
                     unit="percentunit", max_=1, description="From the sidecar (NVML); empty on hosts without a GPU."))
    b.add(timeseries("Completed requests/s (last 60 s)",
                     target(f"muai_throughput_requests_per_second{{{M}}}", "{{model}}"), unit="reqps",
                     description="The orchestrator's own windowed throughput gauge."), w=24)
    return b.render()


def engines() -> dict:
    b = Board(
        "muai-engines",
        "MuAI / Engines and models",
        "Per engine and model: latency, fallbacks, batching, caches and model loading.",
        [
            query_variable("model", "Model", "label_values(muai_model_loaded, model)"),
            query_variable("engine", "Engine", "label_values(muai_model_loaded, engine)"),
        ],
    )
    b.row("Latency per engine and model")
    b.add(timeseries("p95 latency by engine and model",
                     target(quantile(0.95, "muai_request_latency_seconds", ME, "model, engine"), "{{model}} on {{engine}}"),
                     unit="s", threshold=LATENCY_P95_THRESHOLD_S))
    b.add(timeseries("p50 latency by engine and model",
                     target(quantile(0.5, "muai_request_latency_seconds", ME, "model, engine"), "{{model}} on {{engine}}"),
                     unit="s"))
    b.add(timeseries("Requests/s by engine and model",
                     target(f'sum by (model, engine) ({rate("muai_request_latency_seconds_count", ME)})',
                            "{{model}} on {{engine}}"), unit="reqps"))
    b.add(timeseries("Generated tokens/s by engine and model",
                     target(f'sum by (model, engine) ({rate("muai_generation_tokens_total", ME)})',
                            "{{model}} on {{engine}}")))

    b.row("Engines, fallbacks and loading")
    b.add(table("Loaded models", target(f"muai_model_loaded{{{ME}}} == 1"),
                description="Where each model runs now."))
    b.add(timeseries("Engine fallbacks",
                     target(f'sum by (model, from, to, reason) (increase(muai_engine_fallbacks_total{{{M}}}[{RI}]))',
                            "{{model}}: {{from}} -> {{to}} ({{reason}})"),
                     bars=True, description="An engine failed to load or to infer and the next in the chain took over."))
    b.add(timeseries("Model lifecycle events",
                     target(f'sum by (model, event) (increase(muai_model_lifecycle_events_total{{{M}}}[{RI}]))',
                            "{{model}} {{event}}"), bars=True))
    b.add(timeseries("Mean model load time",
                     target(f"muai_model_load_seconds_sum{{{ME}}} / muai_model_load_seconds_count{{{ME}}}",
                            "{{model}} on {{engine}}"), unit="s",
                     description="Mean over the process lifetime: loads are too rare for a rate window."))

    b.row("Batching")
    b.add(timeseries(
        "Mean batch size",
        target(f'sum by (model, engine) ({rate("muai_batch_inference_count_total", ME)})'
               f' / sum by (model, engine) ({rate("muai_batch_execution_count_total", ME)})', "{{model}} on {{engine}}"),
        description="Requests executed / batch executions (Triton's inference count over execution count)."))
    b.add(timeseries("Batch size percentiles",
                     target(quantile(0.5, "muai_batch_size", ME, "model, engine"), "p50 {{model}} on {{engine}}"),
                     target(quantile(0.95, "muai_batch_size", ME, "model, engine"), "p95 {{model}} on {{engine}}")))
    b.add(heatmap("Batch size distribution",
                  target(f'sum by (le) (increase(muai_batch_size_bucket{{{ME}}}[{RI}]))', "{{le}}")))
    b.add(timeseries("Batch executions/s",
                     target(f'sum by (model, engine) ({rate("muai_batch_execution_count_total", ME)})',
                            "{{model}} on {{engine}}"), unit="ops"))

    b.row("Caches")
    kv = ratio_or_zero(rate("muai_kv_cache_hits_total", M),
                       f'{rate("muai_kv_cache_hits_total", M)} + {rate("muai_kv_cache_misses_total", M)}', "model")
    prefix = ratio_or_zero(rate("muai_prefix_cache_hits_total", M), rate("muai_prefix_cache_queries_total", M), "model")
    b.add(timeseries("Cache hit rates", target(kv, "KV (conversations) {{model}}"),
                     target(prefix, "vLLM prefix (tokens) {{model}}"), unit="percentunit", max_=1,
                     description="KV: conversation turns that found their history; prefix: prompt tokens served from "
                                 "vLLM's prefix cache."))
    b.add(timeseries("KV cache evictions/s",
                     target(f'sum by (model) ({rate("muai_kv_cache_evictions_total", M)})', "{{model}}"), unit="ops"))
    b.add(timeseries("KV cache memory", target(f"sum by (model) (muai_kv_cache_bytes{{{M}}})", "{{model}}"), unit="bytes"))
    b.add(timeseries("KV cache entries", target(f"sum by (model) (muai_kv_cache_entries{{{M}}})", "{{model}}"),
                     description="Conversations whose KV state is held."))
    return b.render()


def gpu_host() -> dict:
    b = Board(
        "muai-gpu-host",
        "MuAI / GPUs and host",
        "Per-GPU (NVML, DCGM meanings) and host (psutil) resources, from the sidecar; the orchestrator's own view too.",
        [
            query_variable("instance", "Sidecar", "label_values(muai_sidecar_gpu_available, instance)"),
            query_variable("gpu", "GPU", "label_values(muai_gpu_utilization_ratio, gpu)"),
        ],
    )
    # One sidecar per node: its instance label tells the nodes apart.
    I = 'instance=~"$instance"'
    G = f'{I}, gpu=~"$gpu"'
    gpu_legend = "{{instance}} GPU {{gpu}}"
    b.row("GPUs")
    b.add(timeseries("GPU utilisation", target(f"muai_gpu_utilization_ratio{{{G}}}", gpu_legend),
                     unit="percentunit", max_=1, description="DCGM_FI_DEV_GPU_UTIL."))
    b.add(timeseries("Memory copy utilisation", target(f"muai_gpu_memory_copy_utilization_ratio{{{G}}}", gpu_legend),
                     unit="percentunit", max_=1, description="DCGM_FI_DEV_MEM_COPY_UTIL."))
    b.add(timeseries("Framebuffer used",
                     target(f"muai_gpu_framebuffer_used_bytes{{{G}}}", "used " + gpu_legend),
                     target(f"muai_gpu_framebuffer_total_bytes{{{G}}}", "total " + gpu_legend), unit="bytes"))
    b.add(timeseries("Framebuffer used %",
                     target(f"muai_gpu_framebuffer_used_bytes{{{G}}} / muai_gpu_framebuffer_total_bytes{{{G}}}", gpu_legend),
                     unit="percentunit", max_=1, threshold=MEMORY_THRESHOLD_RATIO,
                     description="The line is the HighGpuMemory threshold."))
    b.add(timeseries("Temperature", target(f"muai_gpu_temperature_celsius{{{G}}}", gpu_legend), unit="celsius", min_=None))
    b.add(timeseries("Power",
                     target(f"muai_gpu_power_watts{{{G}}}", "draw " + gpu_legend),
                     target(f"muai_gpu_power_limit_watts{{{G}}}", "limit " + gpu_legend), unit="watt"))
    b.add(timeseries("XID and ECC errors",
                     target(f"increase(muai_gpu_xid_errors_total{{{G}}}[{RI}])", "XID " + gpu_legend),
                     target(f"sum by (instance, gpu, type) (increase(muai_gpu_ecc_errors_total{{{G}}}[{RI}]))",
                            "ECC {{type}} " + gpu_legend),
                     bars=True, description="Any XID error deserves a look at the driver log (last code beside)."))
    b.add(timeseries("Last XID code", target(f"muai_gpu_last_xid{{{G}}}", gpu_legend),
                     description="Code of the latest XID the driver reported (see NVIDIA's XID table)."))
    b.add(timeseries("Clocks",
                     target(f"muai_gpu_sm_clock_hertz{{{G}}}", "SM " + gpu_legend),
                     target(f"muai_gpu_memory_clock_hertz{{{G}}}", "memory " + gpu_legend), unit="hertz"))
    b.add(timeseries("GPU memory by process",
                     target(f"muai_gpu_process_memory_used_bytes{{{G}}}", "pid {{pid}} on " + gpu_legend), unit="bytes",
                     stack=True, description="vLLM's tensor-parallel workers each hold their own share."))
    b.add(timeseries("GPU memory as the orchestrator sees it",
                     target('muai_gpu_memory_used_bytes{gpu=~"$gpu"}', "used {{instance}} GPU {{gpu}}"),
                     target('muai_gpu_memory_total_bytes{gpu=~"$gpu"}', "total {{instance}} GPU {{gpu}}"), unit="bytes",
                     description="From the orchestrator's /metrics (NVML, or torch's reserved memory without NVML)."),
          w=24)

    b.row("Host and processes")
    b.add(timeseries("Host CPU", target(f"muai_host_cpu_utilization_ratio{{{I}}}", "{{instance}}"),
                     unit="percentunit", max_=1))
    b.add(timeseries("Host memory",
                     target(f"muai_host_memory_used_bytes{{{I}}}", "used {{instance}}"),
                     target(f"muai_host_memory_available_bytes{{{I}}}", "available {{instance}}"),
                     target(f"muai_host_memory_total_bytes{{{I}}}", "total {{instance}}"), unit="bytes"))
    b.add(timeseries("Host memory used %", target(f"muai_host_memory_utilization_ratio{{{I}}}", "{{instance}}"),
                     unit="percentunit", max_=1, threshold=MEMORY_THRESHOLD_RATIO,
                     description="The line is the HighHostMemory threshold."))
    b.add(timeseries("Orchestrator CPU",
                     target(f"muai_orchestrator_process_cpu_utilization_ratio{{{I}}}", "seen by sidecar {{instance}}"),
                     target(f"rate(muai_process_cpu_seconds_total[{RI}])", "reported by orchestrator {{instance}}"),
                     unit="percentunit", description="Fraction of one core; above 100% means more than one core."))
    b.add(timeseries("Orchestrator resident memory (RSS)",
                     target(f"muai_orchestrator_process_resident_memory_bytes{{{I}}}", "seen by sidecar {{instance}}"),
                     target("muai_process_resident_memory_bytes", "reported by orchestrator {{instance}}"), unit="bytes",
                     description="The serving process only: engine worker processes (vLLM) are not included."))
    b.add(timeseries("Sidecar's view", target(f"muai_orchestrator_process_up{{{I}}}", "orchestrator found {{instance}}"),
                     target(f"muai_sidecar_gpu_available{{{I}}}", "NVML readable {{instance}}"), max_=1,
                     description="Whether the sidecar finds the orchestrator process, and whether NVML answers."))
    return b.render()


def sidecar_alerts() -> dict:
    b = Board(
        "muai-sidecar-alerts",
        "MuAI / Sidecar and alerts",
        "Span ingestion, the sidecar's rolling-window statistics, detector scores, alerts and notifications.",
        [
            query_variable("window", "Window", "label_values(muai_sidecar_latency_seconds, window)", multi=False),
            query_variable("model", "Model", "label_values(muai_sidecar_requests_total, model)"),
        ],
    )
    W = 'model=~"$model", window="$window"'
    series = "{{model}} {{operation}}"
    b.row("Span ingestion")
    b.add(timeseries("Spans/s",
                     target(f'rate(muai_sidecar_spans_received_total[{RI}])', "received"),
                     target(f'rate(muai_sidecar_spans_rejected_total[{RI}])', "rejected"),
                     target(f'sum by (scope) ({rate("muai_sidecar_span_samples_total")})', "fed statistics: {{scope}}"),
                     target(f'rate(muai_sidecar_span_samples_untracked_total[{RI}])', "untracked (max_series)"),
                     unit="ops"))
    b.add(timeseries("OTLP export requests/s",
                     target(f'sum by (encoding, code) ({rate("muai_sidecar_export_requests_total")})', "{{encoding}} {{code}}"),
                     unit="reqps", stack=True, description="Requests at /v1/traces by encoding and HTTP status."))
    b.add(timeseries("Forwarding to the tracing backend",
                     target(f'rate(muai_sidecar_forwarded_batches_total[{RI}])', "forwarded"),
                     target(f'rate(muai_sidecar_forward_failures_total[{RI}])', "failed"),
                     target(f'rate(muai_sidecar_forward_dropped_batches_total[{RI}])', "dropped (queue full)"),
                     unit="ops", description="Only when sidecar.forwarding.endpoint is set."))
    b.add(timeseries("Sidecar errors and state",
                     target(f'sum by (collector) (increase(muai_sidecar_collector_errors_total[{RI}]))', "collector {{collector}}"),
                     target(f'increase(muai_sidecar_evaluation_errors_total[{RI}])', "evaluation"),
                     target("muai_sidecar_series", "series tracked"),
                     target("muai_sidecar_forward_queue_batches", "forwarding queue")))

    b.row("Rolling-window statistics (as the detectors see them)")
    b.add(timeseries("Latency p95 per series", target(f'muai_sidecar_latency_seconds{{{W}, quantile="0.95"}}', series),
                     unit="s", threshold=LATENCY_P95_THRESHOLD_S))
    b.add(timeseries("Latency p50 / p99 per series",
                     target(f'muai_sidecar_latency_seconds{{{W}, quantile="0.5"}}', "p50 " + series),
                     target(f'muai_sidecar_latency_seconds{{{W}, quantile="0.99"}}', "p99 " + series), unit="s"))
    b.add(timeseries("Error ratio per series", target(f"muai_sidecar_error_ratio{{{W}}}", series),
                     unit="percentunit", threshold=ERROR_RATIO_THRESHOLD))
    b.add(timeseries("Throughput per series",
                     target(f"muai_sidecar_throughput_requests_per_second{{{W}}}", "requests " + series),
                     target(f"muai_sidecar_inference_throughput_per_second{{{W}}}", "inferences " + series), unit="reqps"))
    b.add(timeseries("Time to first token p95 per series",
                     target(f'muai_sidecar_time_to_first_token_seconds{{{W}, quantile="0.95"}}', series), unit="s"))
    b.add(timeseries("Inference latency p95 per series",
                     target(f'muai_sidecar_inference_latency_seconds{{{W}, quantile="0.95"}}', series), unit="s"))
    b.add(timeseries("Tokens/s per series",
                     target(f"muai_sidecar_input_tokens_per_second{{{W}}}", "in " + series),
                     target(f"muai_sidecar_output_tokens_per_second{{{W}}}", "out " + series)))
    b.add(timeseries("Requests in window", target(f"muai_sidecar_window_requests{{{W}}}", series),
                     description="Rules judge a series only above their min_count."))

    b.row("Detectors and alerts")
    b.add(stat("Alerts firing", target("muai_sidecar_alerts_firing"), red_above=1), w=6, h=4)
    b.add(stat("Alerts pending", target("muai_sidecar_alerts_pending")), w=6, h=4)
    b.add(stat("Prometheus alerts firing", target('count(ALERTS{alertstate="firing"}) or vector(0)'), red_above=1,
               description="From the rules in dashboards/prometheus/rules (Prometheus's own ALERTS series)."), w=6, h=4)
    b.add(stat("Requests seen by the sidecar", target("sum(muai_sidecar_requests_total)")), w=6, h=4)
    b.add(timeseries("Detector scores",
                     target(f"muai_sidecar_detector_score{{{M}}}", "{{detector}} {{model}} {{operation}}"),
                     min_=None, description="EWMA / MAD / CUSUM on each series' p95 per detector interval (log latency, rises only); larger is more anomalous."))
    b.add(timeseries("Alerts firing and pending",
                     target("muai_sidecar_alerts_firing", "firing (sidecar)"),
                     target("muai_sidecar_alerts_pending", "pending (sidecar)"),
                     target('sum by (alertname, severity) (ALERTS{alertstate="firing"})', "{{alertname}} {{severity}} (Prometheus)")))
    b.add(timeseries("Alert transitions",
                     target(f'sum by (state) (increase(muai_sidecar_alert_transitions_total[{RI}]))', "{{state}}"), bars=True))

    b.row("Auto-tuner (sidecar.tuner)")
    b.add(timeseries("Admission and batch size as set",
                     target('muai_runtime_setting{key=~"server.queue_capacity|batching.max_batch_size|server.max_running_per_model"}',
                            "{{key}}"),
                     description="The orchestrator's current values (muai_runtime_setting): what the tuner or an operator "
                                 "set through PATCH /admin/config. Each step is a tuner decision when the tuner is on."))
    b.add(timeseries("Batch timeout and wait bound as set",
                     target('muai_runtime_setting{key=~"batching.batch_timeout_s|server.max_queue_wait_s"}', "{{key}}"),
                     unit="s", description="server.max_queue_wait_s is absent while unset (admission by count only)."),
          w=6)
    b.add(timeseries("KV-cache budget as set", target('muai_runtime_setting{key="kv_cache.budget_bytes"}', "{{key}}"),
                     unit="bytes"), w=6)
    b.add(timeseries("Tuner decisions by knob and reason",
                     target(f'sum by (knob, reason) (increase(muai_tuner_decisions_total[{RI}]))', "{{knob}} {{reason}}"),
                     target(f'sum by (knob) (increase(muai_tuner_rollbacks_total[{RI}]))', "rollback {{knob}}"),
                     bars=True, description="GET /api/v1/tuner on the sidecar lists each decision with the readings "
                                            "behind it; the sidecar's log has one line per decision."))
    b.add(timeseries("Goodput and tuner health",
                     target("muai_tuner_goodput_requests_per_second", "goodput (met the SLO), req/s"),
                     target("muai_tuner_orchestrator_up", "orchestrator reachable"),
                     target(f'sum by (kind) (increase(muai_tuner_errors_total[{RI}]))', "errors {{kind}}"),
                     description="A tuner that cannot reach the orchestrator changes nothing: the last applied "
                                 "settings stay in place."))

    b.row("Notifications by sink")
    b.add(timeseries("Notifications/s by sink and outcome",
                     target(f'sum by (sink) ({rate("muai_sidecar_notifications_sent_total")})', "sent {{sink}}"),
                     target(f'sum by (sink) ({rate("muai_sidecar_notifications_failed_total")})', "failed {{sink}}"),
                     target(f'sum by (sink) ({rate("muai_sidecar_notifications_dropped_total")})', "dropped {{sink}}"),
                     target(f'sum by (sink) ({rate("muai_sidecar_notification_retries_total")})', "retried {{sink}}"),
                     unit="ops"))
    b.add(timeseries("Suppressed by rate limiting",
                     target(f'sum by (sink, reason) ({rate("muai_sidecar_notifications_suppressed_total")})',
                            "{{sink}} {{reason}}"), unit="ops", stack=True))
    b.add(timeseries("Notifications queued", target("sum by (sink) (muai_sidecar_notifications_queued)", "{{sink}}"),
                     description="Waiting for delivery; a growing queue means a slow or unreachable sink."))
    b.add(timeseries("Orchestrator telemetry problems",
                     target(f'sum by (signal) (increase(muai_telemetry_export_failures_total[{RI}]))', "export failed: {{signal}}"),
                     target(f'sum by (component) (increase(muai_telemetry_collector_errors_total[{RI}]))',
                            "sampler failed: {{component}}"),
                     bars=True, description="Spans the orchestrator dropped (the collector or sidecar was unreachable), "
                                            "and its metric samplers that raised; serving goes on either way."))
    return b.render()


DASHBOARDS = {
    "muai-overview.json": overview,
    "muai-engines.json": engines,
    "muai-gpu-host.json": gpu_host,
    "muai-sidecar-alerts.json": sidecar_alerts,
}


def build_all() -> dict[str, dict]:
    """File name -> dashboard model, in a fixed order."""
    return {name: make() for name, make in DASHBOARDS.items()}


def dumps(dashboard: dict) -> str:
    return json.dumps(dashboard, indent=2, sort_keys=False, ensure_ascii=False) + "\n"


def iter_panels(dashboard: dict) -> Iterator[dict]:
    """Every panel, rows' nested panels included."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def iter_exprs(dashboard: dict) -> Iterator[tuple[str, str]]:
    """(panel title, PromQL) of every panel target, as written (with Grafana variables)."""
    for panel in iter_panels(dashboard):
        for tgt in panel.get("targets", []):
            yield panel["title"], tgt["expr"]


def variable_queries(dashboard: dict) -> Iterator[str]:
    """The ``label_values(...)`` queries of the query variables."""
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]
            yield query["query"] if isinstance(query, dict) else query


_VAR = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")


def render_expr(expr: str, *, rate_interval: str = "1m", values: dict[str, str] | None = None) -> str:
    """Substitute Grafana's variables the way Grafana does with everything at "All", giving plain PromQL.

    ``$__rate_interval``/``$__interval``/``$__range`` become ``rate_interval``; a variable in ``values`` becomes
    its value; any other variable becomes ``.*`` (the All value) -- use ``values={"window": "1m"}`` for the
    single-valued ``window``.
    """
    values = dict(values or {})

    def sub(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        if name in ("__rate_interval", "__interval", "__range"):
            return rate_interval
        return values.get(name, ".*")

    return _VAR.sub(sub, expr)


def write(out_dir: Path = OUT_DIR) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, dashboard in build_all().items():
        path = out_dir / name
        path.write_text(dumps(dashboard), encoding="utf-8")
        paths.append(path)
    return paths


def check(out_dir: Path = OUT_DIR) -> list[str]:
    """Names of the files that are missing or differ from what :func:`build_all` makes."""
    stale = []
    for name, dashboard in build_all().items():
        path = out_dir / name
        if not path.is_file() or path.read_text(encoding="utf-8") != dumps(dashboard):
            stale.append(name)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the committed JSON is stale")
    args = parser.parse_args(argv)
    if args.check:
        stale = check()
        if stale:
            print(f"stale: {', '.join(stale)}; run python dashboards/build.py", file=sys.stderr)
            return 1
        return 0
    for path in write():
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
