"""The committed dashboards are models Grafana's own SDK reads back without losing a key."""

from __future__ import annotations

import copy
import json

import pytest
from dashboards_helpers import DASHBOARDS

from grafana_foundation_sdk.cog import plugins
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard as model

FILES = sorted(p.name for p in (DASHBOARDS / "grafana").glob("*.json"))


def _without_empty_custom(dashboard: dict) -> dict:
    """Reading a heatmap gives it an empty ``fieldConfig.defaults.custom``: no setting, so not a difference."""
    out = copy.deepcopy(dashboard)
    for panel in out["panels"]:
        defaults = panel.get("fieldConfig", {}).get("defaults", {})
        if defaults.get("custom") == {}:
            del defaults["custom"]
    return out


def round_trip(dashboard: dict) -> dict:
    plugins.register_default_plugins()  # panel options and Prometheus queries decode into their typed models
    return json.loads(json.dumps(model.Dashboard.from_json(dashboard), cls=JSONEncoder))


@pytest.mark.parametrize("name", FILES)
def test_dashboard_reads_back_through_the_sdk_model_unchanged(name: str):
    dashboard = json.loads((DASHBOARDS / "grafana" / name).read_text(encoding="utf-8"))
    assert _without_empty_custom(round_trip(dashboard)) == _without_empty_custom(dashboard)


def test_the_round_trip_catches_a_key_grafana_does_not_know():
    dashboard = json.loads((DASHBOARDS / "grafana" / FILES[0]).read_text(encoding="utf-8"))
    # A misspelt panel field: the typed model has no place for it, so it is gone after the round trip.
    dashboard["panels"][1]["gridPoss"] = dashboard["panels"][1]["gridPos"]
    assert _without_empty_custom(round_trip(dashboard)) != _without_empty_custom(dashboard)
