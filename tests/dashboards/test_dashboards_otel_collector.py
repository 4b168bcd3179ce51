"""otel-collector.yaml's structure. No collector binary that reads YAML installs here, so the checks the collector
would make at start-up are made here: every component a pipeline names is defined, and the exporters point where
MuAI listens."""

from __future__ import annotations

from urllib.parse import urlsplit

from dashboards_helpers import ROOT, load_yaml

from sidecar.config import DEFAULT_PORT

CONFIG = ROOT / "otel-collector.yaml"
SECTIONS = ("receivers", "processors", "exporters", "connectors", "extensions")


def config() -> dict:
    return load_yaml(CONFIG)


def kind(component_id: str) -> str:
    """``otlphttp/muai-sidecar`` -> ``otlphttp`` (the collector's type[/name] ids)."""
    return component_id.split("/", 1)[0]


def test_every_pipeline_names_defined_receivers_processors_and_exporters():
    c = config()
    pipelines = c["service"]["pipelines"]
    assert pipelines
    for name, pipeline in pipelines.items():
        for section in ("receivers", "processors", "exporters"):
            assert pipeline.get(section) or section == "processors", f"pipeline {name} has no {section}"
            for component in pipeline.get(section, []):
                defined = c.get(section) or {}
                if section in ("receivers", "exporters"):
                    defined = {**defined, **(c.get("connectors") or {})}
                assert component in defined, f"pipeline {name}: {section[:-1]} {component!r} is not defined"
    for extension in c["service"].get("extensions", []):
        assert extension in (c.get("extensions") or {}), f"extension {extension!r} is not defined"


def test_every_defined_component_is_used():
    c = config()
    used = set(c["service"].get("extensions", []))
    for pipeline in c["service"]["pipelines"].values():
        for section in ("receivers", "processors", "exporters"):
            used |= set(pipeline.get(section, []))
    defined = {component for section in SECTIONS for component in (c.get(section) or {})}
    assert defined - used == set()


def test_traces_pipeline_limits_memory_first_then_batches():
    traces = config()["service"]["pipelines"]["traces"]
    processors = [kind(p) for p in traces["processors"]]
    assert processors[0] == "memory_limiter", "memory_limiter must run first to refuse data before it piles up"
    assert "batch" in processors


def test_otlp_receiver_listens_on_the_standard_ports():
    protocols = config()["receivers"]["otlp"]["protocols"]
    assert protocols["grpc"]["endpoint"].rsplit(":", 1)[1] == "4317"
    assert protocols["http"]["endpoint"].rsplit(":", 1)[1] == "4318"
    assert "otlp" in config()["service"]["pipelines"]["traces"]["receivers"]


def test_sidecar_exporter_targets_the_sidecar_default_port_without_the_traces_path():
    c = config()
    traces = c["service"]["pipelines"]["traces"]["exporters"]
    sidecar = [e for e in traces if kind(e) == "otlphttp"]
    assert len(sidecar) == 1
    url = urlsplit(c["exporters"][sidecar[0]]["endpoint"])
    assert (url.scheme, url.hostname, url.port) == ("http", "127.0.0.1", DEFAULT_PORT)
    # otlphttp appends /v1/traces itself; a path here would make it post to .../v1/traces/v1/traces.
    assert url.path in ("", "/")
    assert "traces_endpoint" not in c["exporters"][sidecar[0]]


def test_a_tracing_backend_exporter_speaks_otlp():
    c = config()
    traces = c["service"]["pipelines"]["traces"]["exporters"]
    backends = [e for e in traces if kind(e) == "otlp"]
    assert len(backends) == 1
    assert c["exporters"][backends[0]]["endpoint"]


def test_the_file_explains_itself():
    text = CONFIG.read_text(encoding="utf-8")
    comments = [line for line in text.splitlines() if line.lstrip().startswith("#")]
    assert len(comments) >= 15
    for word in ("sidecar", "Jaeger", "Tempo", "/v1/traces"):
        assert word in text
