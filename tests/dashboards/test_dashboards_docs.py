"""docs/deployment.md stays true to the assets: the files, uids, alerts and ports it names exist."""

from __future__ import annotations

import re

from dashboards_helpers import ROOT, build, load_yaml

from orchestrator.config import ServerConfig
from sidecar.config import DEFAULT_PORT

DOC = ROOT / "docs" / "deployment.md"


def text() -> str:
    return DOC.read_text(encoding="utf-8")


def test_every_repository_path_it_names_exists():
    paths = set(re.findall(r"(?<![/\w])((?:dashboards|docs)/[\w./*-]+\w|otel-collector\.yaml)", text()))
    assert paths
    for path in sorted(paths):
        matches = list(ROOT.glob(path)) if "*" in path else [ROOT / path]
        assert matches and all(m.exists() for m in matches), path


def test_it_names_every_dashboard_uid_and_every_alert():
    doc = text()
    for dashboard in build().build_all().values():
        assert f"`{dashboard['uid']}`" in doc
    rules = load_yaml(ROOT / "dashboards" / "prometheus" / "rules" / "muai-alerts.yml")
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert f"`{rule['alert']}`" in doc, rule["alert"]


def test_default_ports_match_the_processes():
    doc = text()
    assert f"127.0.0.1:{ServerConfig().port}" in doc
    assert f"127.0.0.1:{DEFAULT_PORT}" in doc


def test_it_covers_one_and_many_gpus_and_a_local_stack():
    doc = text()
    for heading in ("## On one GPU box", "## On a multi-GPU box", "## Bring the whole stack up locally"):
        assert heading in doc
    for command in ("prometheus --config.file=dashboards/prometheus/prometheus.yml",
                    "prometheus-alertmanager --config.file=dashboards/alertmanager/alertmanager.yml",
                    "--cluster.listen-address=", "deepspeed --num_gpus", "tensor_parallel_size"):
        assert command in doc, command
