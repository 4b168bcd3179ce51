"""Shared by the ops-asset tests: the dashboard generator, the metric names MuAI really exports, PromQL checks."""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import os
import re
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

import yaml
from support.procs import PROMTOOL

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = ROOT / "dashboards"
NO_PROMTOOL = "promtool is not installed (Debian package prometheus, installed by scripts/bootstrap.sh)"
NO_AMTOOL = "amtool is not installed (Debian package prometheus-alertmanager, installed by scripts/bootstrap.sh)"

# Series Prometheus makes itself rather than scraping them.
PROMETHEUS_BUILTINS = frozenset({"up", "ALERTS", "ALERTS_FOR_STATE", "scrape_duration_seconds", "scrape_samples_scraped"})


@functools.cache
def build() -> ModuleType:
    """``dashboards/build.py``, imported by path (``dashboards/`` is not a Python package)."""
    spec = importlib.util.spec_from_file_location("muai_dashboards_build", DASHBOARDS / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


# --- exported names ---------------------------------------------------------------------------------------------


_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
}


def _series(registry) -> dict[str, frozenset[str] | None]:
    """Sample name -> the label names its samples carry (None: no sample yet, so labels unknown).

    Names come from the families, so a labelled metric with no children still counts as exported.
    """
    out: dict[str, frozenset[str] | None] = {}
    for family in registry.collect():
        for suffix in _SUFFIXES.get(family.type, ("",)):
            out.setdefault(family.name + suffix, None)
        for sample in family.samples:
            labels = frozenset(sample.labels)
            known = out.get(sample.name)
            out[sample.name] = labels if known is None else known | labels
    return out


def orchestrator_series() -> dict[str, frozenset[str] | None]:
    """A real :class:`orchestrator.metrics.ServerMetrics` registry after one of everything its hooks record."""
    from prometheus_client import CollectorRegistry

    from muai.config import MuaiConfig
    from orchestrator.metrics import ResourceSnapshot, ServerMetrics, runtime_settings

    metrics = ServerMetrics(CollectorRegistry())
    # What the background samplers hand over on a GPU box with an engine that reports every cache statistic.
    metrics.set_resources(
        ResourceSnapshot(cpu_seconds=1.0, resident_bytes=1, gpu_used_bytes={"0": 1}, gpu_total_bytes={"0": 2}, gpu_source="nvml")
    )
    metrics.set_engine_stats("m", {
        key: 1.0 for key in (
            "kv_cache_hits", "kv_cache_misses", "kv_cache_evictions", "kv_cache_bytes", "kv_cache_entries",
            "prefix_cache_hits", "prefix_cache_queries",
        )
    })
    metrics.model("m", "torch").observe(e2e_s=0.2, queue_s=0.01, prompt_tokens=3, completion_tokens=4, ttft_s=0.05, tpot_s=0.01)
    metrics.request_done("m", "chat", "ok")
    metrics.reject("queue_full")
    metrics.bind_queue_gauges("m", lambda: 0.0, lambda: 1.0)
    metrics.on_batch("m", "torch", 4)
    metrics.on_fallback("m", "vllm", "torch", "load_failed")
    metrics.on_lifecycle("m", "load_ok", engine="torch", duration_s=1.0)
    metrics.export_failures_traces.inc()
    metrics.collector_errors.labels("resources").inc()
    metrics.sample_throughput(0.0)
    metrics.settings = lambda: runtime_settings(MuaiConfig())
    return _series(metrics.registry)


def sidecar_series() -> dict[str, frozenset[str] | None]:
    """A real sidecar app's registry (``create_app``; nothing started) after one span, one GPU and one host sample."""
    from prometheus_client import CollectorRegistry

    from sidecar.app import STATE, collect_once, create_app
    from sidecar.collectors.gpu import GpuProcess, GpuSample
    from sidecar.collectors.host import HostCollector
    from sidecar.config import SidecarConfig
    from sidecar.otlp import INFERENCE, REQUEST, SpanSample

    async def run() -> dict[str, frozenset[str] | None]:
        with tempfile.TemporaryDirectory() as tmp:
            # The sidecar finds "the orchestrator" by PID file: here, this very process.
            pid_file = Path(tmp) / "orchestrator.pid"
            pid_file.write_text(str(os.getpid()))
            config = SidecarConfig(
                collectors={"gpu": {"enabled": False}},
                forwarding={"endpoint": "http://127.0.0.1:9/v1/traces"},
            )
            registry = CollectorRegistry()
            app = create_app(config, registry=registry, host_collector=HostCollector(pid_file=str(pid_file)))
            state = app[STATE]
            await collect_once(state)
            state.metrics.export("protobuf", 200)
            # No GPU here: one reading as NVML would give it on a GPU box.
            state.gpu_samples = [GpuSample(
                index=0, uuid="GPU-0", name="test", utilization_ratio=0.5, memory_utilization_ratio=0.1,
                framebuffer_used_bytes=1, framebuffer_free_bytes=1, framebuffer_total_bytes=2, temperature_celsius=40.0,
                power_watts=100.0, power_limit_watts=300.0, sm_clock_hz=1e9, memory_clock_hz=1e9, xid_errors_total=0,
                last_xid=0, ecc_corrected_total=0, ecc_uncorrected_total=0, processes=[GpuProcess(pid=1, used_bytes=1)],
            )]
            now = state.clock()
            state.monitor.record(SpanSample(REQUEST, "m", "chat", 0.2, False, ttft_s=0.05, input_tokens=3, output_tokens=4), now)
            state.monitor.record(SpanSample(INFERENCE, "m", "chat", 0.1, False), now)
            return _series(registry)

    return asyncio.run(run())


@functools.cache
def exported_series() -> dict[str, frozenset[str] | None]:
    """Every series name the orchestrator and the sidecar can export, with its label names where known."""
    out = dict(orchestrator_series())
    for name, labels in sidecar_series().items():
        known = out.get(name)
        out[name] = labels if known is None else (known if labels is None else known | labels)
    return out


# --- PromQL -------------------------------------------------------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_BRACES = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENT = re.compile(r"(?<![\w.:$])([A-Za-z_:][\w:]*)(?!\w)(\s*\()?")
_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
                       "group_left", "group_right", "inf", "nan", "atan2"})


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (not functions, keywords, label names or values)."""
    text = _STRING.sub('""', expr)
    text = _BRACES.sub("", text)
    text = _RANGE.sub("", text)
    text = _GROUPING.sub("", text)
    names = set()
    for match in _IDENT.finditer(text):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in _KEYWORDS:
            continue
        names.add(name)
    return names


def promtool_parse(exprs: Iterable[str], workdir: Path) -> subprocess.CompletedProcess:
    """Parse PromQL with Prometheus's own parser: each expression becomes a recording rule for ``promtool check rules``."""
    rules = [{"record": f"muai:dashboard_check:{i}", "expr": expr} for i, expr in enumerate(exprs)]
    path = workdir / "dashboard-exprs.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard-exprs", "rules": rules}]}, sort_keys=False))
    return subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)


def seconds(duration: str) -> float:
    """A Prometheus duration such as ``30s``, ``2m`` or ``1h30m`` in seconds."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    parts = re.findall(r"(\d+)(ms|[smhdwy])", duration)
    if not parts or "".join(n + u for n, u in parts) != duration:
        raise ValueError(f"not a duration: {duration!r}")
    return sum(int(n) * units[u] for n, u in parts)


_SELECTOR = re.compile(r"(?<![\w.:$])([A-Za-z_:][\w:]*)\s*\{([^{}]*)\}")
_MATCHER = re.compile(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)")
_AGGREGATION = re.compile(r"\b(?:by)\s*\(([^()]*)\)\s*\(")


def matched_labels(expr: str) -> list[tuple[str, set[str]]]:
    """(metric, label names in its matchers) for every ``metric{...}`` selector."""
    text = _STRING.sub('""', expr)
    return [(m.group(1), set(_MATCHER.findall(m.group(2)))) for m in _SELECTOR.finditer(text)]


def grouped_labels(expr: str) -> list[tuple[set[str], set[str]]]:
    """(labels of a ``by (...)`` clause, metric names in the aggregated expression) for every ``agg by (...) (...)``."""
    text = _STRING.sub('""', expr)
    out = []
    for match in _AGGREGATION.finditer(text):
        depth, start = 1, match.end()
        end = start
        while depth and end < len(text):
            depth += {"(": 1, ")": -1}.get(text[end], 0)
            end += 1
        labels = {label.strip() for label in match.group(1).split(",") if label.strip()}
        out.append((labels, metric_names(text[start:end - 1])))
    return out
